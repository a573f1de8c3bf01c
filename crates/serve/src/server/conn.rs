//! The connection layer of both APIs: the accept loops (a connection cap over both ports;
//! excess connections are refused at once — HTTP with a 503 answer — without touching the
//! served ones), per-connection timeouts (a new connection's first request head within the
//! header-read timeout; an idle keep-alive or HTTP/2 connection closed after the idle
//! timeout), the front-door checks of every request (API key, CORS and `Host` on HTTP, the
//! `authorization` metadata on gRPC, body size and body-read time on both) and the accounting
//! a drain waits on (requests in flight). Every HTTP error leaves as OpenAI error JSON.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::Front;

/// A body error of any source (a concrete type: a boxed trait object in the body type trips
/// the compiler's higher-ranked `Send` checks in the connection futures).
#[derive(Debug)]
pub struct BodyError(pub Box<dyn std::error::Error + Send + Sync + 'static>);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {}

impl BodyError {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> BodyError {
        BodyError(Box::new(e))
    }
}

pub type BoxBody = UnsyncBoxBody<Bytes, BodyError>;
/// What a listener serves: the HTTP router or the gRPC routes, boxed.
pub type Svc = tower::util::BoxCloneService<Request<BoxBody>, Response<BoxBody>, Infallible>;

/// Which API a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Http,
    Grpc,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::Http => "http",
            Api::Grpc => "grpc",
        }
    }
}

/// Where a request came from: its connection (gRPC request ids are namespaced by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// Unique for the process's lifetime.
    pub id: u64,
    pub peer: SocketAddr,
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// The soft open-file limit (`RLIMIT_NOFILE`).
pub fn open_file_limit() -> usize {
    #[cfg(unix)]
    {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
            return usize::try_from(r.rlim_cur).unwrap_or(usize::MAX);
        }
    }
    1024
}

/// Raises the soft open-file limit to the hard limit; returns the soft limit in force.
pub fn raise_open_file_limit() -> usize {
    #[cfg(unix)]
    {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit / setrlimit read and write the struct we own.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
                let want = libc::rlimit {
                    rlim_cur: r.rlim_max,
                    rlim_max: r.rlim_max,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &want);
            }
        }
    }
    open_file_limit()
}

/// What a connection's watchdog sees: requests in flight on it, when the last one ended,
/// bytes read.
struct Activity {
    active: AtomicUsize,
    requests: AtomicU64,
    read_bytes: AtomicU64,
    last_end: Mutex<Instant>,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            active: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            last_end: Mutex::new(Instant::now()),
        })
    }
}

/// Counts one request in flight (on the server and on its connection) until dropped — with
/// the response body, so a stream counts until its last byte went out or its client left.
struct Inflight {
    front: Arc<Front>,
    act: Arc<Activity>,
}

impl Inflight {
    fn new(front: &Arc<Front>, act: &Arc<Activity>) -> Inflight {
        front.inflight.fetch_add(1, Ordering::SeqCst);
        front.metrics.requests_in_flight.inc();
        act.active.fetch_add(1, Ordering::SeqCst);
        act.requests.fetch_add(1, Ordering::SeqCst);
        Inflight {
            front: front.clone(),
            act: act.clone(),
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        *self.act.last_end.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.act.active.fetch_sub(1, Ordering::SeqCst);
        self.front.metrics.requests_in_flight.dec();
        self.front.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that holds its request's [`Inflight`].
struct Tracked {
    inner: BoxBody,
    _guard: Inflight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A socket that counts the bytes read from it and, on HTTP, turns hyper's own bodiless error
/// answers (400 for an unparsable request, 431 for headers too large) into OpenAI error JSON.
struct ConnIo<T> {
    inner: T,
    act: Arc<Activity>,
    rewrite: bool,
    /// Bytes still to write (a rewritten answer) before anything else.
    pending: Vec<u8>,
}

/// hyper's answer to a request it could not parse: `HTTP/1.1 4xx|5xx …` with
/// `content-length: 0` (the router's errors always carry a JSON body). Returns its status.
fn bodiless_error(buf: &[u8]) -> Option<StatusCode> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = &buf[..head_end + 2];
    if !head.starts_with(b"HTTP/1.1 ") || !matches!(head.get(9), Some(b'4' | b'5')) {
        return None;
    }
    let lower = head.to_ascii_lowercase();
    if !lower.windows(19).any(|w| w == b"\r\ncontent-length: 0") {
        return None;
    }
    StatusCode::from_bytes(head.get(9..12)?).ok()
}

fn error_bytes(status: StatusCode) -> Vec<u8> {
    let message = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            "the request headers are too large (at most 64 KiB)"
        }
        StatusCode::BAD_REQUEST => "the request is not valid HTTP/1.1",
        s => s.canonical_reason().unwrap_or("request failed"),
    };
    let kind = if status.is_client_error() {
        "BadRequestError"
    } else {
        "InternalServerError"
    };
    let body = serde_json::json!({"error": {"message": message, "type": kind, "param": null,
        "code": status.as_u16()}})
    .to_string();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

impl<T: AsyncRead + AsyncWrite + Unpin> ConnIo<T> {
    /// Writes what is pending; `Ready(Ok)` once nothing is.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// Whether `buf` is one of hyper's bodiless errors, now queued as JSON instead.
    fn rewrote(&mut self, buf: &[u8]) -> bool {
        if !self.rewrite {
            return false;
        }
        match bodiless_error(buf) {
            Some(status) => {
                self.pending = error_bytes(status);
                true
            }
            None => false,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.act.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.poll_pending(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        if self.rewrote(buf) {
            let _ = self.poll_pending(cx);
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(first) if self.rewrite || !self.pending.is_empty() => {
                self.poll_write(cx, &first[..])
            }
            _ => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Completes once the flag is up.
async fn raised(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|c| *c).await;
}

/// The answer to a connection over the cap (HTTP): written without waiting, then closed.
fn refusal(max: usize) -> Vec<u8> {
    let body = serde_json::json!({"error": {
        "message": format!("too many connections (this server takes {max}); retry later"),
        "type": "ServiceUnavailableError", "param": null, "code": 503}})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Accepts connections on `listener` until the server closes, serving each with `svc` (the
/// HTTP router or the gRPC routes) behind the front-door checks.
pub async fn accept_loop(
    listener: TcpListener,
    api: Api,
    front: Arc<Front>,
    svc: Svc,
) -> Result<()> {
    let mut close = front.close_tx.subscribe();
    let max = front.limits.connections();
    let refused_http = refusal(max);
    loop {
        let accepted = tokio::select! {
            _ = raised(&mut close) => return Ok(()),
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors (or a connection reset before accept): wait a
                // moment instead of spinning; the served connections go on.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let permit = match front.conn_slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                front
                    .metrics
                    .refused_connections
                    .with_label_values(&[api.label()])
                    .inc();
                if api == Api::Http {
                    let _ = stream.try_write(&refused_http);
                }
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        front
            .metrics
            .accepted_connections
            .with_label_values(&[api.label()])
            .inc();
        let front = front.clone();
        let svc = svc.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let gauge = front
                .metrics
                .open_connections
                .with_label_values(&[api.label()]);
            gauge.inc();
            serve_connection(stream, peer, api, front, svc).await;
            gauge.dec();
        });
    }
}

/// Serves one connection until it ends, times out idle, or the server closes.
pub(crate) async fn serve_connection<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: T,
    peer: SocketAddr,
    api: Api,
    front: Arc<Front>,
    svc: Svc,
) {
    let info = ConnInfo {
        id: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
        peer,
    };
    let act = Activity::new();
    let io = TokioIo::new(ConnIo {
        inner: stream,
        act: act.clone(),
        rewrite: api == Api::Http,
        pending: Vec::new(),
    });
    let service = {
        let front = front.clone();
        let act = act.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let svc = svc.clone();
            let front = front.clone();
            let act = act.clone();
            let fut: Pin<
                Box<dyn std::future::Future<Output = Result<Response<Tracked>, Infallible>> + Send>,
            > = Box::pin(async move {
                let guard = Inflight::new(&front, &act);
                let resp = match api {
                    Api::Http => http_request(req, svc, front.clone(), info).await,
                    Api::Grpc => grpc_request(req, svc, front.clone(), info).await,
                };
                Ok::<_, Infallible>(resp.map(|b| Tracked {
                    inner: b,
                    _guard: guard,
                }))
            });
            fut
        })
    };
    let mut drain = front.drain_tx.subscribe();
    // A connection accepted during a drain is served (its requests get 503 / UNAVAILABLE);
    // only those open when the drain began are asked to close.
    let _ = *drain.borrow_and_update();
    let mut close = front.close_tx.subscribe();
    let limits = front.limits.clone();
    let watchdog = idle_watchdog(act.clone(), api, limits.clone(), front.clone());
    tokio::pin!(watchdog);
    macro_rules! drive {
        ($conn:expr) => {{
            let mut conn = std::pin::pin!($conn);
            let mut graceful = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = raised(&mut close) => break,
                    _ = drain.changed(), if !graceful => {
                        conn.as_mut().graceful_shutdown();
                        graceful = true;
                    }
                    _ = &mut watchdog, if !graceful => {
                        front.metrics.closed_idle_connections.with_label_values(&[api.label()]).inc();
                        if api == Api::Http {
                            break;
                        }
                        // HTTP/2: GOAWAY, then a moment for the peer to see it.
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                        break;
                    }
                }
            }
        }};
    }
    match api {
        Api::Http => {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout.max(limits.idle_timeout))
                .max_buf_size(128 << 10)
                .max_header_size(64 << 10)
                .keep_alive(true);
            drive!(b.serve_connection(io, service));
        }
        Api::Grpc => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20))
                .max_concurrent_streams(Some(256))
                .max_header_list_size(64 << 10);
            drive!(b.serve_connection(io, service));
        }
    }
}

/// Completes when the connection should be closed for inactivity: no request in flight and
/// - nothing received since it opened (or, HTTP/1, since its last request ended) for the
///   idle timeout — the header-read timeout before its first request;
/// - HTTP/1: a request head begun but not finished within the header-read timeout.
async fn idle_watchdog(act: Arc<Activity>, api: Api, limits: super::Limits, front: Arc<Front>) {
    let tick = Duration::from_millis(250);
    let mut quiet_since = Instant::now();
    let mut head_since: Option<Instant> = None;
    let mut bytes_at_rest = 0u64;
    let mut was_active = false;
    loop {
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        if act.active.load(Ordering::SeqCst) > 0 {
            was_active = true;
            continue;
        }
        let bytes = act.read_bytes.load(Ordering::Relaxed);
        if was_active {
            // A request just ended: the connection is at rest from its end.
            was_active = false;
            quiet_since = *act.last_end.lock().unwrap_or_else(|p| p.into_inner());
            bytes_at_rest = bytes;
            head_since = None;
        }
        let never = act.requests.load(Ordering::SeqCst) == 0;
        let draining = front.is_draining();
        match api {
            Api::Http if bytes != bytes_at_rest => {
                // A request head is arriving.
                let since = *head_since.get_or_insert(if never { quiet_since } else { now });
                if now - since >= limits.header_read_timeout {
                    return;
                }
            }
            _ => {
                let limit = if never && bytes == 0 {
                    limits.header_read_timeout
                } else if draining {
                    Duration::from_secs(1).min(limits.idle_timeout)
                } else {
                    limits.idle_timeout
                };
                if now - quiet_since >= limit {
                    return;
                }
            }
        }
    }
}

/// Bytes of an incoming body, read within `timeout` and at most `max` bytes.
enum BodyRead {
    Ok(Bytes),
    TooLarge,
    TimedOut,
    Failed(String),
}

async fn read_body(body: Incoming, max: usize, timeout: Duration) -> BodyRead {
    match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Err(_) => BodyRead::TimedOut,
        Ok(Ok(c)) => BodyRead::Ok(c.to_bytes()),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                BodyRead::TooLarge
            } else {
                BodyRead::Failed(e.to_string())
            }
        }
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Whether `token` is the API key (constant time in the key's bytes).
fn key_matches(key: &str, token: &[u8]) -> bool {
    key.as_bytes().ct_eq(token).into()
}

/// The bearer token of an `authorization` value.
fn bearer(v: Option<&HeaderValue>) -> Option<&[u8]> {
    let b = v?.as_bytes();
    let (scheme, rest) = (b.get(..7)?, b.get(7..)?);
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// Whether a `Host` value names loopback (`localhost`, `127.x.y.z`, `[::1]`, any port).
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, _)) => h,
            None => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let name = name.trim_end_matches('.');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn allowed_origin(front: &Front, origin: &str) -> bool {
    front
        .security
        .allowed_origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response<BoxBody> {
    super::http::error_response(status, message.into(), None).map(box_axum)
}

pub fn box_axum(b: axum::body::Body) -> BoxBody {
    b.map_err(BodyError::new).boxed_unsync()
}

pub fn full(b: Bytes) -> BoxBody {
    Full::new(b).map_err(|e| match e {}).boxed_unsync()
}

fn reject(front: &Front, cause: &str, resp: Response<BoxBody>) -> Response<BoxBody> {
    front
        .metrics
        .rejected_requests
        .with_label_values(&[cause])
        .inc();
    resp
}

/// The HTTP front door: `Host` (loopback binds), CORS (preflight and origin), API key, body
/// size and read time; then the router; then any non-JSON error turned into OpenAI's shape.
async fn http_request(
    req: Request<Incoming>,
    svc: Svc,
    front: Arc<Front>,
    info: ConnInfo,
) -> Response<BoxBody> {
    let front = &front;
    let (mut parts, body) = req.into_parts();
    let mut resp = 'checked: {
        if front.loopback_http_port.is_some() {
            let host = parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
                .or_else(|| parts.uri.authority().map(|a| a.to_string()));
            if let Some(h) = host.filter(|h| !is_loopback_host(h)) {
                break 'checked reject(
                    front,
                    "host",
                    json_error(
                        StatusCode::FORBIDDEN,
                        format!(
                            "Host {h:?} is not allowed: this server listens on loopback and \
                             answers only for localhost / 127.0.0.1 / [::1]"
                        ),
                    ),
                );
            }
        }
        let origin = parts
            .headers
            .get(header::ORIGIN)
            .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned());
        if let Some(o) = &origin {
            let preflight = parts.method == Method::OPTIONS
                && parts
                    .headers
                    .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
            if !allowed_origin(front, o) {
                break 'checked reject(
                    front,
                    "origin",
                    json_error(
                        StatusCode::FORBIDDEN,
                        format!(
                            "cross-origin requests from {o:?} are not allowed \
                             (the server's --allowed-origins)"
                        ),
                    ),
                );
            }
            if preflight {
                let mut r = Response::new(full(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                let h = r.headers_mut();
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("GET, POST, OPTIONS"),
                );
                let asked = parts
                    .headers
                    .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                    .cloned()
                    .unwrap_or(HeaderValue::from_static(
                        "authorization, content-type, x-request-id",
                    ));
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
                h.insert(
                    header::ACCESS_CONTROL_MAX_AGE,
                    HeaderValue::from_static("600"),
                );
                if let Ok(v) = HeaderValue::from_str(o) {
                    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
                }
                break 'checked r;
            }
        }
        let exempt = matches!(parts.uri.path(), "/health" | "/metrics");
        if let (Some(key), false) = (&front.security.api_key, exempt) {
            let ok = bearer(parts.headers.get(header::AUTHORIZATION))
                .is_some_and(|t| key_matches(key, t));
            if !ok {
                let mut r = json_error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong API key: send `Authorization: Bearer <key>`",
                );
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                break 'checked reject(front, "auth", r);
            }
        }
        let max = front.limits.max_request_bytes;
        let too_large = || {
            let mut r = json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than this server's limit of {max} bytes (--max-request-bytes)"),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            reject(front, "size", r)
        };
        if content_length(&parts.headers).is_some_and(|n| n > max as u64) {
            break 'checked too_large();
        }
        let bytes = match read_body(body, max, front.limits.body_read_timeout).await {
            BodyRead::Ok(b) => b,
            BodyRead::TooLarge => break 'checked too_large(),
            BodyRead::TimedOut => {
                let mut r = json_error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} s (--body-read-timeout)",
                        front.limits.body_read_timeout.as_secs()
                    ),
                );
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                break 'checked reject(front, "body_timeout", r);
            }
            BodyRead::Failed(e) => {
                break 'checked json_error(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body: {e}"),
                )
            }
        };
        parts.extensions.insert(info);
        let req = Request::from_parts(parts, full(bytes));
        let resp = match svc.oneshot(req).await {
            Ok(r) => r,
            Err(e) => match e {},
        };
        let resp = jsonify_error(resp).await;
        if let Some(o) = &origin {
            let mut resp = resp;
            if let Ok(v) = HeaderValue::from_str(o) {
                let h = resp.headers_mut();
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
                h.insert(
                    header::ACCESS_CONTROL_EXPOSE_HEADERS,
                    HeaderValue::from_static("x-request-id"),
                );
            }
            break 'checked resp;
        }
        resp
    };
    if !front.security.allowed_origins.is_empty() {
        resp.headers_mut()
            .append(header::VARY, HeaderValue::from_static("Origin"));
    }
    if front.is_draining() {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A router error without a JSON body (axum's 405, an extractor's rejection) in OpenAI's
/// shape, its text as the message.
async fn jsonify_error(resp: Response<BoxBody>) -> Response<BoxBody> {
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|c| c.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match Limited::new(body, 64 << 10).collect().await {
        Ok(c) => String::from_utf8_lossy(&c.to_bytes()).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string()
    } else {
        text
    };
    let mut r = json_error(status, message);
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = parts.headers.get(&name) {
            r.headers_mut().insert(name, v.clone());
        }
    }
    r
}

pub fn grpc_status(s: tonic::Status) -> Response<BoxBody> {
    s.into_http::<tonic::body::Body>()
        .map(|b| b.map_err(BodyError::new).boxed_unsync())
}

/// The gRPC front door: the `authorization` metadata (health exempt); `ultra.v1.Engine` calls
/// (unary requests) are read whole within the body-read timeout and size limit first.
async fn grpc_request(
    req: Request<Incoming>,
    svc: Svc,
    front: Arc<Front>,
    info: ConnInfo,
) -> Response<BoxBody> {
    let front = &front;
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let exempt = path.starts_with("/grpc.health.v1.Health/");
    if let (Some(key), false) = (&front.security.api_key, exempt) {
        let ok =
            bearer(parts.headers.get(header::AUTHORIZATION)).is_some_and(|t| key_matches(key, t));
        if !ok {
            return reject(
                front,
                "auth",
                grpc_status(tonic::Status::unauthenticated(
                    "missing or wrong API key: send the metadata `authorization: Bearer <key>`",
                )),
            );
        }
    }
    parts.extensions.insert(info);
    let body = if path.starts_with("/ultra.v1.Engine/") {
        // The gRPC frame header adds 5 bytes to the message.
        let max = front.limits.max_request_bytes;
        match read_body(body, max + 5, front.limits.body_read_timeout).await {
            BodyRead::Ok(b) => full(b),
            BodyRead::TooLarge => {
                return reject(
                    front,
                    "size",
                    grpc_status(tonic::Status::resource_exhausted(format!(
                        "the request is larger than this server's limit of {max} bytes \
                         (--max-request-bytes)"
                    ))),
                )
            }
            BodyRead::TimedOut => {
                return reject(
                    front,
                    "body_timeout",
                    grpc_status(tonic::Status::deadline_exceeded(format!(
                        "the request message did not arrive within {} s (--body-read-timeout)",
                        front.limits.body_read_timeout.as_secs()
                    ))),
                )
            }
            BodyRead::Failed(e) => {
                return grpc_status(tonic::Status::cancelled(format!(
                    "reading the request: {e}"
                )))
            }
        }
    } else {
        body.map_err(BodyError::new).boxed_unsync()
    };
    match svc.oneshot(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => match e {},
    }
}
