//! The OpenAI-compatible HTTP API (axum): `POST /v1/completions`, `POST /v1/chat/completions`
//! (SSE streaming ending in `data: [DONE]`, `stream_options.include_usage`, logprobs),
//! `GET /v1/models`, `GET /health` (503 while loading), `GET /metrics` (Prometheus text), and
//! vLLM's `POST /tokenize` (`prompt` or chat `messages` → `{count, max_model_len, tokens,
//! token_strs}`) and `POST /detokenize` (`tokens` → `{prompt}`).
//!
//! Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for
//! malformed JSON or parameters (negative or too large `max_tokens`, prompt too long, invalid
//! UTF-8), 404 for an unknown model, 429 when the queue is full, 503 while loading or shutting
//! down. `x-request-id` is honoured (as the request id) and echoed.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use model::sampling::SamplingParams;
use model::tokenizer::{ChatMessage, Tokenizer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{tokenize, AppState, Input};
use crate::engine::{
    EngineHandle, Event, Finished, GenerateRequest, SubmitError, TokenLogprob, MAX_TOP_LOGPROBS,
};

/// An OpenAI-style error response.
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let status = match e {
            SubmitError::Invalid(_) | SubmitError::TooLong(_) => StatusCode::BAD_REQUEST,
            SubmitError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            SubmitError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            _ => "InternalServerError",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }});
        (self.status, Json(body)).into_response()
    }
}

/// `"text"` or `["a", "b"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A completion prompt: text, token ids, or a list of one of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Chat message content: a string or OpenAI content parts (text parts are joined).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

/// Fields shared by both endpoints (unknown fields are ignored, as vLLM does).
#[derive(Debug, Default, Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    stop_token_ids: Option<Vec<u32>>,
    ignore_eos: Option<bool>,
    n: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    /// Number of top log-probabilities per token (0..=20).
    logprobs: Option<u32>,
    echo: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::bad("the request body is not valid UTF-8"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

fn engine(state: &AppState) -> Result<&EngineHandle, ApiError> {
    state
        .engine()
        .map_err(|u| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, u.to_string()))
}

/// Sampling parameters and `max_tokens` from the shared fields.
fn sampling(c: &Common) -> Result<(SamplingParams, Option<usize>), ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("only n = 1 is supported").param("n"));
    }
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => None,
        Some(m) if m < 1 => {
            return Err(
                ApiError::bad(format!("max_tokens must be at least 1, got {m}"))
                    .param("max_tokens"),
            )
        }
        Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
    };
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k < 0 => {
            return Err(
                ApiError::bad(format!("top_k must be -1 (off) or at least 1, got {k}"))
                    .param("top_k"),
            )
        }
        Some(k) => Some(k as usize),
    };
    let stop_strings = match &c.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    let params = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k,
        top_p: c.top_p,
        min_p: c.min_p,
        repetition_penalty: c.repetition_penalty,
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        seed: c.seed,
        max_tokens: model::sampling::DEFAULT_MAX_TOKENS,
        stop_token_ids: c.stop_token_ids.clone().unwrap_or_default(),
        stop_strings,
        ignore_eos: c.ignore_eos.unwrap_or(false),
    };
    params.validate().map_err(|e| {
        let bad = ApiError::bad(e.to_string());
        match e.param() {
            Some(p) => bad.param(p),
            None => bad,
        }
    })?;
    Ok((params, max_tokens))
}

fn check_model(state: &AppState, c: &Common) -> Result<(), ApiError> {
    check_model_name(state, c.model.as_deref())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get("x-request-id") {
        None => Ok(String::new()),
        Some(v) => v
            .to_str()
            .map(str::to_string)
            .map_err(|_| ApiError::bad("x-request-id is not visible ASCII")),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Completion,
    Chat,
}

/// What a handler needs to answer one request.
struct Job {
    api: Api,
    state: AppState,
    id: String,
    created: u64,
    stream: bool,
    include_usage: bool,
    logprobs: Option<usize>,
}

fn token_text(tok: Option<&Tokenizer>, id: u32) -> String {
    tok.and_then(|t| t.decode(&[id], false).ok())
        .unwrap_or_else(|| format!("<{id}>"))
}

/// The `logprobs` object of a choice (completions: parallel arrays; chat: `content` list).
fn logprobs_json(api: Api, tok: Option<&Tokenizer>, lps: &[TokenLogprob]) -> Value {
    match api {
        Api::Completion => {
            let tokens: Vec<String> = lps.iter().map(|l| token_text(tok, l.token)).collect();
            let token_logprobs: Vec<f64> = lps.iter().map(|l| l.logprob).collect();
            let top: Vec<Value> = lps
                .iter()
                .map(|l| {
                    let mut m = serde_json::Map::new();
                    for &(t, lp) in &l.top {
                        m.insert(token_text(tok, t), json!(lp));
                    }
                    Value::Object(m)
                })
                .collect();
            json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top})
        }
        Api::Chat => {
            let entry = |t: u32, lp: f64| {
                let s = token_text(tok, t);
                json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
            };
            let content: Vec<Value> = lps
                .iter()
                .map(|l| {
                    let mut e = entry(l.token, l.logprob);
                    e["top_logprobs"] = l.top.iter().map(|&(t, lp)| entry(t, lp)).collect();
                    e
                })
                .collect();
            json!({ "content": content })
        }
    }
}

fn usage(f: &Finished) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    })
}

impl Job {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completion, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    fn wrap(&self, choices: Value, usage: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(self.stream),
            "created": self.created,
            "model": self.state.model_id(),
            "choices": choices,
        });
        if !self.stream || self.include_usage {
            v["usage"] = usage;
        }
        v
    }

    /// One streamed choice: a text delta, its logprobs, the finish reason when it ends.
    fn chunk_choice(
        &self,
        text: &str,
        lps: Option<Value>,
        finish: Option<&Finished>,
        first: bool,
    ) -> Value {
        let mut c = match self.api {
            Api::Completion => json!({"index": 0, "text": text}),
            Api::Chat => {
                let mut delta = json!({"content": text});
                if first {
                    delta["role"] = json!("assistant");
                }
                json!({"index": 0, "delta": delta})
            }
        };
        c["logprobs"] = lps.unwrap_or(Value::Null);
        c["finish_reason"] = finish.map_or(Value::Null, |f| json!(f.reason.as_str()));
        if let Some(f) = finish {
            c["stop_reason"] = json!(f.stop_reason);
        }
        c
    }
}

/// Submits and answers (streaming or not).
async fn run(
    job: Job,
    req: GenerateRequest,
    headers_id: Option<String>,
) -> Result<Response, ApiError> {
    let engine = engine(&job.state)?.clone();
    let sub = engine.submit(req)?;
    let mut job = job;
    job.id = match job.api {
        Api::Completion => format!("cmpl-{}", sub.id),
        Api::Chat => format!("chatcmpl-{}", sub.id),
    };
    let mut response = if job.stream {
        stream_response(job, engine, sub.events)
    } else {
        full_response(job, engine, sub.events).await?
    };
    if let Some(id) = headers_id {
        if let Ok(v) = HeaderValue::from_str(&id) {
            response.headers_mut().insert("x-request-id", v);
        }
    }
    Ok(response)
}

async fn full_response(
    job: Job,
    engine: EngineHandle,
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Tokens(t) => {
                text.push_str(&t.text);
                lps.extend(t.logprobs);
            }
            Event::Finished(f) => {
                if let Some(e) = &f.error {
                    return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.clone()));
                }
                text.push_str(&f.text);
                let lp = job
                    .logprobs
                    .map(|_| logprobs_json(job.api, engine.tokenizer(), &lps));
                let mut choice = match job.api {
                    Api::Completion => json!({"index": 0, "text": text}),
                    Api::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                    }),
                };
                choice["logprobs"] = lp.unwrap_or(Value::Null);
                choice["finish_reason"] = json!(f.reason.as_str());
                choice["stop_reason"] = json!(f.stop_reason);
                let body = job.wrap(json!([choice]), usage(&f));
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine stopped before the request finished",
    ))
}

fn stream_response(
    job: Job,
    engine: EngineHandle,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Response {
    let mut first = true;
    let frames = UnboundedReceiverStream::new(events).flat_map(move |ev| {
        let tok = engine.tokenizer();
        let mut out: Vec<String> = Vec::new();
        match ev {
            Event::Tokens(t) => {
                let lp = job
                    .logprobs
                    .map(|_| logprobs_json(job.api, tok, &t.logprobs));
                let c = job.chunk_choice(&t.text, lp, None, first);
                first = false;
                out.push(job.wrap(json!([c]), Value::Null).to_string());
            }
            Event::Finished(f) => {
                if let Some(e) = &f.error {
                    out.push(
                        json!({"error": {"message": e, "type": "InternalServerError", "code": 500}})
                            .to_string(),
                    );
                } else {
                    let c = job.chunk_choice(&f.text, None, Some(&f), first);
                    out.push(job.wrap(json!([c]), Value::Null).to_string());
                    if job.include_usage {
                        out.push(job.wrap(json!([]), usage(&f)).to_string());
                    }
                }
                out.push("[DONE]".to_string());
            }
        }
        futures_util::stream::iter(
            out.into_iter()
                .map(|d| Ok::<_, Infallible>(SseEvent::default().data(d))),
        )
    });
    Sse::new(frames)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let r: CompletionRequest = parse(&body)?;
    check_model(&state, &r.common)?;
    let engine = engine(&state)?;
    if r.echo == Some(true) {
        return Err(ApiError::bad("echo is not supported").param("echo"));
    }
    let input = match r.prompt {
        Prompt::Text(t) => Input::Text(t),
        Prompt::Tokens(t) => Input::Tokens(t),
        Prompt::Texts(mut v) if v.len() == 1 => Input::Text(v.remove(0)),
        Prompt::TokenLists(mut v) if v.len() == 1 => Input::Tokens(v.remove(0)),
        _ => return Err(ApiError::bad("send one prompt per request").param("prompt")),
    };
    let logprobs = r.logprobs.map(|n| n as usize);
    submit(
        state.clone(),
        engine,
        Api::Completion,
        &headers,
        input,
        &r.common,
        logprobs,
    )
    .await
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let r: ChatRequest = parse(&body)?;
    check_model(&state, &r.common)?;
    let engine = engine(&state)?;
    let msgs = chat_messages(r.messages)?;
    let logprobs = match (r.logprobs, r.top_logprobs) {
        (Some(true), n) => Some(n.unwrap_or(0) as usize),
        (_, Some(n)) if n > 0 => {
            return Err(ApiError::bad("top_logprobs needs logprobs: true").param("top_logprobs"))
        }
        _ => None,
    };
    submit(
        state.clone(),
        engine,
        Api::Chat,
        &headers,
        Input::Chat(msgs),
        &r.common,
        logprobs,
    )
    .await
}

/// OpenAI chat messages as the chat template takes them (text content parts are joined).
fn chat_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    let mut msgs = Vec::with_capacity(messages.len());
    for m in messages {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::bad(format!(
                            "content part type `{}` is not supported (text only)",
                            p.kind
                        ))
                        .param("messages"));
                    }
                    s.push_str(p.text.as_deref().unwrap_or_default());
                }
                s
            }
        };
        msgs.push(ChatMessage::new(m.role, content));
    }
    Ok(msgs)
}

/// vLLM's `/tokenize` body: a completion `prompt` or chat `messages`.
#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    /// Default: true for a prompt, false for messages (the template adds them), as vLLM.
    add_special_tokens: Option<bool>,
    /// Messages only (default true).
    add_generation_prompt: Option<bool>,
    /// Also return each id's token string.
    return_token_strs: Option<bool>,
}

/// vLLM's `/detokenize` body.
#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

fn check_model_name(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != state.model_id() => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("The model `{m}` does not exist."),
        )
        .param("model")),
        _ => Ok(()),
    }
}

fn tokenizer_of(engine: &EngineHandle) -> Result<&Tokenizer, ApiError> {
    engine
        .tokenizer()
        .ok_or_else(|| ApiError::bad("the model has no tokenizer (tokenizer.json)"))
}

async fn tokenize_route(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let r: TokenizeRequest = parse(&body)?;
    check_model_name(&state, r.model.as_deref())?;
    let engine = engine(&state)?;
    let tok = tokenizer_of(engine)?;
    let tokens = match (r.prompt, r.messages) {
        (Some(p), None) => tok
            .encode(&p, r.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::bad(format!("tokenizing the prompt: {e}")).param("prompt"))?,
        (None, Some(m)) => {
            let msgs = chat_messages(m)?;
            if msgs.is_empty() {
                return Err(ApiError::bad("messages is empty").param("messages"));
            }
            let text = tok
                .apply_chat_template(&msgs, r.add_generation_prompt.unwrap_or(true))
                .map_err(|e| {
                    ApiError::bad(format!("applying the chat template: {e}")).param("messages")
                })?;
            tok.encode(&text, r.add_special_tokens.unwrap_or(false))
                .map_err(|e| ApiError::bad(format!("tokenizing the chat: {e}")).param("messages"))?
        }
        _ => return Err(ApiError::bad("give either `prompt` or `messages`")),
    };
    let token_strs = match r.return_token_strs {
        Some(true) => Value::from(
            tokens
                .iter()
                .map(|&t| tok.id_to_token(t).unwrap_or_default())
                .collect::<Vec<_>>(),
        ),
        _ => Value::Null,
    };
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": engine.info().max_context,
        "tokens": tokens,
        "token_strs": token_strs,
    })))
}

async fn detokenize_route(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let r: DetokenizeRequest = parse(&body)?;
    check_model_name(&state, r.model.as_deref())?;
    let engine = engine(&state)?;
    let tok = tokenizer_of(engine)?;
    let vocab = engine.info().vocab_size;
    if let Some(t) = r.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad(format!(
            "token {t} is outside the vocabulary (size {vocab})"
        ))
        .param("tokens"));
    }
    let text = tok
        .decode(&r.tokens, false)
        .map_err(|e| ApiError::bad(format!("detokenizing: {e}")).param("tokens"))?;
    Ok(Json(json!({ "prompt": text })))
}

async fn submit(
    state: AppState,
    engine: &EngineHandle,
    api: Api,
    headers: &HeaderMap,
    input: Input,
    common: &Common,
    logprobs: Option<usize>,
) -> Result<Response, ApiError> {
    if logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(
            ApiError::bad(format!("at most {MAX_TOP_LOGPROBS} top logprobs per token"))
                .param("logprobs"),
        );
    }
    let (params, max_tokens) = sampling(common)?;
    let prompt = tokenize(engine, &input)?;
    let header_id = request_id(headers)?;
    let stream = common.stream.unwrap_or(false);
    let include_usage = common
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let job = Job {
        api,
        state,
        id: String::new(),
        created: unix_now(),
        stream,
        include_usage: stream && include_usage,
        logprobs,
    };
    let req = GenerateRequest {
        id: header_id.clone(),
        prompt,
        params,
        max_tokens,
        logprobs,
    };
    run(job, req, (!header_id.is_empty()).then_some(header_id)).await
}

async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let e = engine(&state)?;
    let i = e.info();
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": i.model_id,
            "object": "model",
            "created": i.created_unix,
            "owned_by": "ultra",
            "root": i.model_id,
            "max_model_len": i.max_context,
        }],
    })))
}

async fn health(State(state): State<AppState>) -> Response {
    match state.engine() {
        Ok(e) if !e.is_draining() => {
            (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
        }
        Ok(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Shutting down").into_response(),
        Err(u) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, u.to_string()).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = match state.engine() {
        Ok(e) => e.metrics().render(),
        Err(_) => String::new(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

/// The HTTP routes over `state`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize_route))
        .route("/detokenize", post(detokenize_route))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Serves the HTTP API on `listener` until `shutdown` completes, then waits for in-flight
/// responses.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
