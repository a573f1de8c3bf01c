//! The fault suite of `ultra serve` (issue 22), over loopback sockets only, every loop bounded:
//! drains that always end (idle and half-open connections on both ports, running streams
//! aborted at the shutdown timeout, the listeners answering 503 / UNAVAILABLE meanwhile, a
//! second signal, a signal while loading — the last two against the `ultra` binary),
//! connection limits and timeouts (cap, header-read, idle, slow body), private request ids,
//! the API key, CORS and the `Host` check, error shapes of both APIs (OpenAI JSON for every
//! HTTP status, gRPC codes as the proto says), memory and latency bounds on oversized prompts,
//! stop-string limits, a disconnect storm, and startup checks.
//! Model: the tiny `qwen3-moe/native` fixture.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, collect, fixture, long_request, text_request, wait_idle, MODEL_ID};
use serde_json::{json, Value};
use serve::engine::EngineConfig;
use serve::proto::v1 as pb;
use serve::server::{load_cpu_engine, Limits, Security, ServeOptions, Server};
use tonic::transport::Channel;

fn options(limits: Limits, security: Security) -> ServeOptions {
    ServeOptions {
        limits,
        security,
        ..common::loopback()
    }
}

fn quick_limits() -> Limits {
    Limits {
        shutdown_timeout: Duration::from_secs(2),
        header_read_timeout: Duration::from_secs(1),
        body_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        max_connections: Some(64),
        max_request_bytes: 64 << 10,
    }
}

async fn start(opts: ServeOptions, max_running: usize) -> Server {
    let cfg = EngineConfig {
        model_id: MODEL_ID.into(),
        max_running,
        max_waiting: 64,
        ..EngineConfig::default()
    };
    let dir = fixture(MODEL_ID);
    let server = Server::start(opts, MODEL_ID.into(), move || {
        load_cpu_engine(&dir, None, None, cfg)
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), server.ready())
        .await
        .unwrap()
        .unwrap();
    server
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
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

    /// Checks OpenAI's error shape with this status.
    fn openai_error(&self) -> String {
        let v = self.json();
        assert_eq!(v["error"]["code"], self.status, "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        v["error"]["message"].as_str().unwrap().to_string()
    }
}

fn read_response(s: TcpStream) -> HttpResponse {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split(' ')
        .nth(1)
        .unwrap_or_else(|| panic!("no status line: {line:?}"))
        .parse()
        .unwrap();
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
    } else if let Some(n) = headers.get("content-length") {
        body = vec![0; n.parse().unwrap()];
        r.read_exact(&mut body).unwrap();
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Sends `method path` with `extra` header lines (each ending in CRLF) and a body.
fn http(addr: SocketAddr, method: &str, path: &str, extra: &str, body: &[u8]) -> HttpResponse {
    let mut s = connect(addr);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_response(s)
}

async fn http_async(
    addr: SocketAddr,
    method: &'static str,
    path: &'static str,
    extra: String,
    body: Vec<u8>,
) -> HttpResponse {
    tokio::task::spawn_blocking(move || http(addr, method, path, &extra, &body))
        .await
        .unwrap()
}

async fn complete(addr: SocketAddr, body: Value) -> HttpResponse {
    http_async(
        addr,
        "POST",
        "/v1/completions",
        String::new(),
        body.to_string().into_bytes(),
    )
    .await
}

/// Whether the server closed `s` (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

async fn health_client(addr: SocketAddr) -> tonic_health::pb::health_client::HealthClient<Channel> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(ch)
}

async fn grpc_health(addr: SocketAddr) -> i32 {
    let mut h = health_client(addr).await;
    h.check(tonic_health::pb::HealthCheckRequest {
        service: "ultra.v1.Engine".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
}

fn long_http_stream(addr: SocketAddr) -> TcpStream {
    let body = json!({"prompt": "count", "max_tokens": 3000, "ignore_eos": true, "stream": true})
        .to_string();
    let mut s = connect(addr);
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    s
}

// ---------------------------------------------------------------------------------------------
// Drain.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_answers_503_and_ends_with_idle_partial_and_running_connections() {
    let server = start(options(quick_limits(), Security::default()), 4).await;
    let (http_addr, grpc_addr) = (server.http_addr, server.grpc_addr);
    // Idle TCP on both ports, half-sent HTTP headers, a running HTTP stream and a running gRPC
    // stream.
    let _idle_http = connect(http_addr);
    let _idle_grpc = connect(grpc_addr);
    let mut partial = connect(http_addr);
    partial
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .unwrap();
    let sse = tokio::task::spawn_blocking(move || {
        let mut r = BufReader::new(long_http_stream(http_addr));
        let mut all = String::new();
        let _ = r.read_to_string(&mut all);
        all
    });
    let mut c = client(&server).await;
    let mut grpc_stream = c
        .generate(long_request("drain-long"))
        .await
        .unwrap()
        .into_inner();
    grpc_stream.message().await.unwrap().unwrap();
    let engine = server.state().engine().unwrap().clone();
    let t0 = Instant::now();
    while engine.load().1 < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let state = server.state().clone();
    let t0 = Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    while !state.front().is_draining() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Meanwhile the listeners answer: 503 JSON, /health 503, gRPC UNAVAILABLE and NOT_SERVING.
    let r = complete(http_addr, json!({"prompt": "x", "max_tokens": 1})).await;
    assert_eq!(r.status, 503);
    assert!(r.openai_error().contains("shutting down"));
    let r = http_async(http_addr, "GET", "/health", String::new(), Vec::new()).await;
    assert_eq!(r.status, 503);
    r.openai_error();
    let mut c2 = client_at(grpc_addr).await;
    let e = c2.generate(long_request("late")).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert_eq!(
        grpc_health(grpc_addr).await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    // The running streams end with "abort" at the 2 s timeout, and the drain ends.
    let got = collect(grpc_stream).await;
    assert_eq!(got.complete.finish_reason, "abort");
    let drained = tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the drain did not end")
        .unwrap()
        .unwrap();
    let took = t0.elapsed();
    assert!(drained.aborted >= 2, "{drained:?}");
    assert!(
        // The bar is timeout + 1 s (met by the release build, BENCHMARKS.md); a debug build on
        // a loaded CI machine gets half a second more.
        took < Duration::from_millis(3500) && took >= Duration::from_secs(2),
        "drain took {took:?}"
    );
    let text = sse.await.unwrap();
    assert!(text.contains("\"finish_reason\":\"abort\""), "{text}");
    assert!(text.contains("data: [DONE]"), "{text}");
    // Everything is closed now.
    assert!(closed_within(&mut partial, Duration::from_secs(2)));
}

async fn client_at(addr: SocketAddr) -> pb::engine_client::EngineClient<Channel> {
    pb::engine_client::EngineClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_only_idle_connections_ends_at_once_and_a_loading_server_stops() {
    let server = start(options(quick_limits(), Security::default()), 2).await;
    let _a = connect(server.http_addr);
    let _b = connect(server.grpc_addr);
    let mut c = client(&server).await;
    // A finished request leaves its keep-alive connection idle.
    c.generate(text_request(
        "hi",
        pb::SamplingParams {
            max_tokens: Some(2),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    let t0 = Instant::now();
    let d = server.shutdown().await.unwrap();
    assert_eq!(d.aborted, 0);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());

    // A model that never finishes loading does not hold a drain.
    let (_tx, rx) = std::sync::mpsc::channel::<()>();
    let server = Server::start(
        options(quick_limits(), Security::default()),
        MODEL_ID.into(),
        move || {
            let _ = rx.recv();
            anyhow::bail!("never")
        },
    )
    .await
    .unwrap();
    let r = complete(server.http_addr, json!({"prompt": "x"})).await;
    assert_eq!(r.status, 503);
    let t0 = Instant::now();
    server.shutdown().await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------------
// The binary: SIGTERM, a second signal, a signal while loading, startup checks.
// ---------------------------------------------------------------------------------------------

fn ultra() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ultra"));
    c.env_remove("ULTRA_API_KEY")
        .env("RUST_BACKTRACE", "0")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc {
    child: Child,
    http: SocketAddr,
    grpc: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_serve(model: &std::path::Path, extra: &[&str]) -> Proc {
    let (h, g) = (free_port(), free_port());
    let child = ultra()
        .args(["serve", "--threads", "1", "--model"])
        .arg(model)
        .args([
            "--http-addr",
            &format!("127.0.0.1:{h}"),
            "--grpc-addr",
            &format!("127.0.0.1:{g}"),
        ])
        .args(extra)
        .spawn()
        .unwrap();
    Proc {
        child,
        http: format!("127.0.0.1:{h}").parse().unwrap(),
        grpc: format!("127.0.0.1:{g}").parse().unwrap(),
    }
}

fn wait_health(p: &Proc, want: u16) {
    let t0 = Instant::now();
    loop {
        assert!(t0.elapsed() < Duration::from_secs(60), "server not up");
        if let Ok(mut s) = TcpStream::connect(p.http) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s
                .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with(&format!("HTTP/1.1 {want}")) {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, sig) }, 0);
}

fn wait_exit(p: &mut Proc, within: Duration) -> (std::process::ExitStatus, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            return (st, t0.elapsed());
        }
        assert!(
            t0.elapsed() < within,
            "the process did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigterm_with_idle_connections_exits_0_and_a_second_signal_exits_at_once() {
    let model = fixture(MODEL_ID);
    // Idle and half-open connections on both ports: exit 0 well within the timeout.
    let mut p = spawn_serve(&model, &["--shutdown-timeout", "3"]);
    wait_health(&p, 200);
    let _idle = [
        TcpStream::connect(p.http).unwrap(),
        TcpStream::connect(p.grpc).unwrap(),
    ];
    let mut half = TcpStream::connect(p.http).unwrap();
    half.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let mut half_grpc = TcpStream::connect(p.grpc).unwrap();
    half_grpc.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    signal(&p, libc::SIGTERM);
    let (st, took) = wait_exit(&mut p, Duration::from_secs(4));
    assert_eq!(st.code(), Some(0), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // A running stream holds the drain; a second signal exits at once, non-zero.
    let mut p = spawn_serve(&model, &["--shutdown-timeout", "60"]);
    wait_health(&p, 200);
    let mut s = long_http_stream(p.http);
    let mut first = [0u8; 64];
    s.read_exact(&mut first).unwrap();
    signal(&p, libc::SIGTERM);
    wait_health(&p, 503);
    signal(&p, libc::SIGINT);
    let (st, took) = wait_exit(&mut p, Duration::from_secs(2));
    assert_eq!(st.code(), Some(128 + libc::SIGINT), "{took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[test]
fn a_signal_while_loading_exits_promptly() {
    // A checkpoint whose config.json is a FIFO nobody writes: loading blocks forever.
    let dir = tempdir("loading");
    let fifo = dir.join("config.json");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut p = spawn_serve(&dir, &[]);
    wait_health(&p, 503);
    signal(&p, libc::SIGTERM);
    let (st, took) = wait_exit(&mut p, Duration::from_secs(3));
    assert_eq!(st.code(), Some(0));
    assert!(took < Duration::from_secs(1), "{took:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ultra-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn startup_refuses_useless_limits_and_a_broken_chat_template() {
    let model = fixture(MODEL_ID);
    for (flag, value) in [
        ("--max-waiting", "0"),
        ("--max-running", "0"),
        ("--max-model-len", "0"),
        ("--kv-cache-mib", "0"),
        ("--shutdown-timeout", "0"),
        ("--max-request-bytes", "10"),
        ("--max-connections", "0"),
        ("--idle-timeout", "0"),
    ] {
        let out = ultra()
            .args(["serve", "--model"])
            .arg(&model)
            .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .args([flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    // A chat template that does not compile fails the load, once, without a backtrace.
    let dir = tempdir("template");
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = json!("{% for m in messages %}{{ m.content }");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = ultra()
        .env("RUST_BACKTRACE", "0")
        .args(["serve", "--model"])
        .arg(&dir)
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("chat template"), "{err}");
    assert_eq!(
        err.matches("chat template does not work").count(),
        1,
        "{err}"
    );
    assert!(
        !err.contains("Caused by") && !err.contains("backtrace"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Connections.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_and_timeouts() {
    let limits = Limits {
        max_connections: Some(6),
        ..quick_limits()
    };
    let server = start(options(limits, Security::default()), 2).await;
    let (http_addr, grpc_addr) = (server.http_addr, server.grpc_addr);

    // Slowloris: half-sent headers are closed after the header-read timeout (1 s).
    let mut slow = connect(http_addr);
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    // An idle TCP connection to the gRPC port (no HTTP/2 preface) likewise.
    let mut idle_grpc = connect(grpc_addr);
    let t0 = Instant::now();
    assert!(closed_within(&mut slow, Duration::from_secs(4)));
    assert!(closed_within(&mut idle_grpc, Duration::from_secs(4)));
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );

    // An idle keep-alive connection is closed after the idle timeout.
    let mut ka = connect(http_addr);
    ka.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 12];
    ka.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    assert!(closed_within(&mut ka, Duration::from_secs(4)));

    // A body that never completes: 408 in OpenAI's shape after the body-read timeout.
    let mut sb = connect(http_addr);
    sb.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"prompt\"",
    )
    .unwrap();
    let r = tokio::task::spawn_blocking(move || read_response(sb))
        .await
        .unwrap();
    assert_eq!(r.status, 408);
    assert!(r.openai_error().contains("--body-read-timeout"));

    // The cap: 6 connections; the 7th is answered 503 (HTTP) and closed, the served ones go
    // on. A running request keeps its connection past the idle timeout.
    let mut c = client(&server).await; // 1
    let mut held: Vec<TcpStream> = (0..4).map(|_| connect(http_addr)).collect(); // 5
    let mut running = c.generate(long_request("cap")).await.unwrap().into_inner();
    running.message().await.unwrap().unwrap();
    let mut sixth = connect(http_addr); // 6
    tokio::time::sleep(Duration::from_millis(100)).await;
    let over = tokio::task::spawn_blocking(move || read_response(connect(http_addr)))
        .await
        .unwrap();
    assert_eq!(over.status, 503);
    assert!(over.openai_error().contains("too many connections"));
    let over_grpc = connect(grpc_addr);
    let mut over_grpc2 = over_grpc.try_clone().unwrap();
    assert!(closed_within(&mut over_grpc2, Duration::from_secs(2)));
    // The sixth connection is served.
    sixth
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = tokio::task::spawn_blocking(move || read_response(sixth))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The idle ones were closed by now; the running stream still runs.
    for h in &mut held {
        assert!(closed_within(h, Duration::from_secs(3)));
    }
    c.abort(pb::AbortRequest {
        request_id: "cap".into(),
    })
    .await
    .unwrap();
    assert_eq!(collect(running).await.complete.finish_reason, "abort");
    let m = http_async(http_addr, "GET", "/metrics", String::new(), Vec::new()).await;
    let text = String::from_utf8_lossy(&m.body).to_string();
    assert!(
        text.contains("ultra:refused_connections_total{api=\"http\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("ultra:closed_idle_connections_total"),
        "{text}"
    );
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Request ids.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_private() {
    let server = start(options(quick_limits(), Security::default()), 4).await;
    let addr = server.http_addr;
    // Two clients, one x-request-id, at once: both served, each echoed.
    let body = json!({"prompt": "hi", "max_tokens": 20, "ignore_eos": true}).to_string();
    let run = |b: String| {
        http_async(
            addr,
            "POST",
            "/v1/completions",
            "x-request-id: same-id\r\n".into(),
            b.into_bytes(),
        )
    };
    let (a, b) = tokio::join!(run(body.clone()), run(body));
    for r in [&a, &b] {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.headers["x-request-id"], "same-id");
        assert_eq!(r.json()["id"], "cmpl-same-id");
    }
    // Server-assigned ids are random, 128-bit.
    let mut c1 = client(&server).await;
    let mut s = c1
        .generate(text_request(
            "x",
            pb::SamplingParams {
                max_tokens: Some(2),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let id = s.message().await.unwrap().unwrap().request_id;
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));

    // Another connection can neither abort a gRPC request by its id nor collide with it.
    let mut c2 = client_at(server.grpc_addr).await;
    let mut mine = c1
        .generate(long_request("victim"))
        .await
        .unwrap()
        .into_inner();
    mine.message().await.unwrap().unwrap();
    let found = c2
        .abort(pb::AbortRequest {
            request_id: "victim".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .found;
    assert!(!found);
    let mut theirs = c2
        .generate(long_request("victim"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        theirs.message().await.unwrap().unwrap().request_id,
        "victim"
    );
    // An HTTP stream's x-request-id is not a gRPC abort target.
    let sse = tokio::task::spawn_blocking(move || {
        let mut s = connect(addr);
        let body = json!({"prompt": "x", "max_tokens": 30, "ignore_eos": true, "stream": true})
            .to_string();
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nx-request-id: web-1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        let mut all = String::new();
        BufReader::new(s).read_to_string(&mut all).unwrap();
        all
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    for id in ["web-1", "web-1-0", "req-0", "req-1"] {
        let found = c2
            .abort(pb::AbortRequest {
                request_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .found;
        assert!(!found, "{id}");
    }
    let text = sse.await.unwrap();
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    // The owner can abort its own.
    for (c, s, id) in [(&mut c1, mine, "victim"), (&mut c2, theirs, "victim")] {
        assert!(
            c.abort(pb::AbortRequest {
                request_id: id.into()
            })
            .await
            .unwrap()
            .into_inner()
            .found
        );
        assert_eq!(collect(s).await.complete.finish_reason, "abort");
    }
    wait_idle(&server).await;
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// API key, CORS, Host.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_cors_and_host() {
    let security = Security {
        api_key: Some("sekret-key".into()),
        allowed_origins: vec!["https://app.example".into()],
    };
    let server = start(options(quick_limits(), security), 2).await;
    let addr = server.http_addr;
    let body = || {
        json!({"prompt": "hi", "max_tokens": 2})
            .to_string()
            .into_bytes()
    };
    let post = |extra: &str| http_async(addr, "POST", "/v1/completions", extra.into(), body());
    for extra in [
        "",
        "Authorization: Bearer WRONG\r\n",
        "Authorization: sekret-key\r\n",
    ] {
        let r = post(extra).await;
        assert_eq!(r.status, 401, "{extra}");
        assert_eq!(r.headers["www-authenticate"], "Bearer");
        assert!(r.openai_error().contains("API key"));
    }
    let r = post("Authorization: Bearer sekret-key\r\n").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    for path in ["/health", "/metrics"] {
        let r = http_async(addr, "GET", path, String::new(), Vec::new()).await;
        assert_eq!(r.status, 200, "{path}");
    }
    // gRPC: the authorization metadata; health is exempt.
    let mut c = client(&server).await;
    let req = || {
        text_request(
            "hi",
            pb::SamplingParams {
                max_tokens: Some(2),
                ..Default::default()
            },
        )
    };
    let e = c.complete(req()).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut r = tonic::Request::new(req());
    r.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(
        c.complete(r).await.err().unwrap().code(),
        tonic::Code::Unauthenticated
    );
    let mut r = tonic::Request::new(req());
    r.metadata_mut()
        .insert("authorization", "Bearer sekret-key".parse().unwrap());
    let out = c.complete(r).await.unwrap().into_inner();
    assert_eq!(out.complete.unwrap().finish_reason, "length");
    assert_eq!(
        grpc_health(server.grpc_addr).await,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // CORS: the allowed origin gets a preflight and its headers; any other is refused, also a
    // "simple" text/plain POST that skips the preflight.
    let r = http_async(
        addr,
        "OPTIONS",
        "/v1/completions",
        "Origin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n".into(),
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(r.headers["access-control-allow-methods"].contains("POST"));
    assert!(r.headers["access-control-allow-headers"].contains("authorization"));
    let r = post("Origin: https://app.example\r\nAuthorization: Bearer sekret-key\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example"
    );
    for extra in [
        "Origin: https://evil.example\r\nAccess-Control-Request-Method: POST\r\n",
        "Origin: https://evil.example\r\nAuthorization: Bearer sekret-key\r\n",
    ] {
        let method = if extra.contains("Request-Method") {
            "OPTIONS"
        } else {
            "POST"
        };
        let r = http_async(addr, method, "/v1/completions", extra.into(), body()).await;
        assert_eq!(r.status, 403, "{extra}");
        assert!(r.openai_error().contains("allowed-origins"));
        assert!(!r.headers.contains_key("access-control-allow-origin"));
    }
    // Host: loopback names pass, others (DNS rebinding) are refused.
    let host = |h: &'static str| {
        tokio::task::spawn_blocking(move || {
            let mut s = connect(addr);
            s.write_all(
                format!("GET /health HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            read_response(s)
        })
    };
    for (h, status) in [
        ("localhost:8000", 200),
        ("127.0.0.1", 200),
        ("[::1]:9", 200),
        ("attacker.example:8000", 403),
        ("localhost.attacker.example", 403),
    ] {
        let r = host(h).await.unwrap();
        assert_eq!(r.status, status, "{h}");
    }
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Error shapes and codes.
// ---------------------------------------------------------------------------------------------

/// A body under `--max-request-bytes` but over axum's own 2 MiB default reaches the handler: the
/// only size limit is the documented one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_up_to_max_request_bytes_reach_the_api() {
    let limits = Limits {
        max_request_bytes: 3 << 20,
        ..quick_limits()
    };
    let server = start(options(limits, Security::default()), 2).await;
    let addr = server.http_addr;
    let prompt = "x ".repeat(5 << 18); // 2.5 MiB
    let r = complete(addr, json!({"prompt": prompt, "max_tokens": 1})).await;
    assert_eq!(r.status, 400, "a 2.5 MiB body under a 3 MiB limit");
    assert!(r.openai_error().contains("prompt"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_the_documented_shape() {
    let server = start(options(quick_limits(), Security::default()), 2).await;
    let addr = server.http_addr;
    // HTTP: 404, 405, 413 (declared and streamed), 400 stop limits — all OpenAI JSON.
    let r = http_async(addr, "GET", "/nope", String::new(), Vec::new()).await;
    assert_eq!(r.status, 404);
    r.openai_error();
    let r = http_async(addr, "GET", "/v1/completions", String::new(), Vec::new()).await;
    assert_eq!(r.status, 405);
    r.openai_error();
    assert!(r.headers["allow"].contains("POST"));
    let big = vec![b' '; 70 << 10];
    let r = http_async(addr, "POST", "/v1/completions", String::new(), big.clone()).await;
    assert_eq!(r.status, 413);
    assert!(r.openai_error().contains("65536 bytes"));
    let stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let r = complete(addr, json!({"prompt": "x", "stop": stops})).await;
    assert_eq!(r.status, 400);
    assert!(r.openai_error().contains("at most 16 stop strings"));
    let r = complete(addr, json!({"prompt": "x", "stop": "y".repeat(300)})).await;
    assert_eq!(r.status, 400);
    assert!(r.openai_error().contains("256 bytes"));
    let r = complete(
        addr,
        json!({"prompt": "x", "max_tokens": 4, "stop": ["a", "b"]}),
    )
    .await;
    assert_eq!(r.status, 200);
    // What hyper itself answers (unparsable request, headers over 64 KiB) is JSON too.
    let mut huge = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ".to_vec();
    huge.extend(vec![b'a'; 70 << 10]);
    huge.extend(b"\r\n\r\n");
    for (bytes, status) in [(b"GARBAGE\r\n\r\n".to_vec(), 400), (huge, 431)] {
        let r = tokio::task::spawn_blocking(move || {
            let mut s = connect(addr);
            s.write_all(&bytes).unwrap();
            read_response(s)
        })
        .await
        .unwrap();
        assert_eq!(r.status, status);
        r.openai_error();
    }

    // gRPC: garbage protobuf and invalid UTF-8 → INVALID_ARGUMENT; oversized →
    // RESOURCE_EXHAUSTED; too many stop strings → INVALID_ARGUMENT.
    for payload in [
        vec![0xff, 0xff, 0xff, 0xff, 0x0f],
        // field 2 (text), length 2, invalid UTF-8.
        vec![0x12, 0x02, 0xc3, 0x28],
    ] {
        let code = raw_grpc(server.grpc_addr, "/ultra.v1.Engine/Complete", &payload).await;
        assert_eq!(code, tonic::Code::InvalidArgument, "{payload:?}");
    }
    let mut c = client(&server).await;
    let e = c
        .complete(text_request(&"x".repeat(70 << 10), Default::default()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("--max-request-bytes"));
    let e = c
        .complete(text_request(
            "x",
            pb::SamplingParams {
                stop: (0..17).map(|i| format!("s{i}")).collect(),
                ..Default::default()
            },
        ))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    server.shutdown().await.unwrap();
}

/// Sends one gRPC call with a raw (possibly invalid) message body; returns its status code.
async fn raw_grpc(addr: SocketAddr, path: &str, payload: &[u8]) -> tonic::Code {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let codec = RawCodec;
    let r = grpc
        .unary::<Vec<u8>, Vec<u8>, _>(
            tonic::Request::new(payload.to_vec()),
            path.parse().unwrap(),
            codec,
        )
        .await;
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// Bytes in, bytes out.
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

// ---------------------------------------------------------------------------------------------
// Memory, latency, disconnects.
// ---------------------------------------------------------------------------------------------

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Eight 2 MB prompts at once against the `ultra` binary (its own process, so other tests do
/// not disturb the measurement): refused before tokenizing, peak RSS growth ≤ 64 MiB, and
/// `/health` answers throughout.
#[test]
fn oversized_prompts_cost_little_and_health_stays_fast() {
    let mut p = spawn_serve(&fixture(MODEL_ID), &["--max-request-bytes", "4194304"]);
    wait_health(&p, 200);
    let pid = p.child.id();
    let addr = p.http;
    let base = rss_kib(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    let prompt = "word ".repeat(400_000); // 2 MB
    let body = json!({"prompt": prompt, "max_tokens": 1})
        .to_string()
        .into_bytes();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || http(addr, "POST", "/v1/completions", "", &body))
        })
        .collect();
    let mut worst = Duration::ZERO;
    while !clients.iter().all(|c| c.is_finished()) {
        let t = Instant::now();
        let h = http(addr, "GET", "/health", "", b"");
        assert_eq!(h.status, 200);
        worst = worst.max(t.elapsed());
    }
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 400);
        assert!(r.openai_error().contains("maximum context length"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let growth_mib = peak.saturating_sub(base) as f64 / 1024.0;
    eprintln!("8 × 2 MB prompts: peak RSS growth {growth_mib:.1} MiB, worst /health {worst:?}");
    assert!(growth_mib <= 64.0, "{growth_mib} MiB");
    // Generous for a debug build on a loaded 2-core CI machine; BENCHMARKS.md has release numbers.
    assert!(worst < Duration::from_millis(500), "{worst:?}");
    signal(&p, libc::SIGTERM);
    assert_eq!(wait_exit(&mut p, Duration::from_secs(5)).0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_storm_leaves_the_gauges_at_zero() {
    let server = start(options(quick_limits(), Security::default()), 4).await;
    let addr = server.http_addr;
    let mut tasks = Vec::new();
    for i in 0..24 {
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut s = long_http_stream(addr);
            // Half read a little, half leave before the first byte.
            if i % 2 == 0 {
                let mut b = [0u8; 32];
                let _ = s.read_exact(&mut b);
            }
            drop(s);
        }));
    }
    let mut c = client(&server).await;
    for i in 0..8 {
        let mut s = c
            .generate(long_request(&format!("storm-{i}")))
            .await
            .unwrap()
            .into_inner();
        if i % 2 == 0 {
            s.message().await.unwrap().unwrap();
        }
        drop(s);
    }
    for t in tasks {
        t.await.unwrap();
    }
    wait_idle(&server).await;
    let engine = server.state().engine().unwrap().clone();
    let t0 = Instant::now();
    while server.state().front().inflight() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = engine.metrics();
    assert_eq!(m.num_requests_running.get(), 0);
    assert_eq!(m.num_requests_waiting.get(), 0);
    assert_eq!(m.kv_cache_usage_perc.get(), 0.0);
    // Still serving.
    let r = complete(addr, json!({"prompt": "x", "max_tokens": 2})).await;
    assert_eq!(r.status, 200);
    server.shutdown().await.unwrap();
}

#[test]
fn default_connection_cap_follows_the_open_file_limit() {
    assert_eq!(serve::server::default_max_connections(256), 192);
    assert_eq!(serve::server::default_max_connections(1024), 768);
    assert_eq!(serve::server::default_max_connections(1 << 20), 10_000);
    assert!(serve::server::conn::is_loopback_host("localhost:1"));
    assert!(serve::server::conn::is_loopback_host("127.3.4.5"));
    assert!(serve::server::conn::is_loopback_host("[::1]:80"));
    assert!(!serve::server::conn::is_loopback_host("example.com"));
    assert!(!serve::server::conn::is_loopback_host("127.0.0.1.nip.io"));
}

#[test]
fn a_short_soak_leaves_no_errors_and_returns_to_idle() {
    use serve::commands::serve::{soak, BenchLoad, ServeDevice, ServeSetup};
    let setup = ServeSetup {
        model: Some(fixture(MODEL_ID)),
        draft: None,
        block_size: None,
        engine: EngineConfig {
            model_id: MODEL_ID.into(),
            max_running: 4,
            max_waiting: 64,
            ..EngineConfig::default()
        },
        device: ServeDevice::Cpu,
        synthetic: None,
    };
    let load = BenchLoad {
        requests: 0,
        concurrency: 6,
        prompt_tokens: 8,
        max_tokens: 8,
        seed: 3,
    };
    let samples = soak(setup, load, 0.05, Duration::from_secs(1)).unwrap();
    let (first, last) = (&samples[0], samples.last().unwrap());
    assert!(last.done > 10, "{last:?}");
    assert_eq!(last.errors, 0, "{last:?}");
    assert_eq!((last.running, last.waiting, last.inflight), (0, 0, 0));
    assert_eq!(last.kv_usage, 0.0);
    // Open fds are the whole test process's (other tests run beside this one): the soak's own
    // connections are what must be gone.
    assert!(last.open_connections <= 1, "{last:?}");
    assert!(first.fds > 0);
}
