//! The OpenAI-compatible HTTP API (axum): `POST /v1/completions`, `POST /v1/chat/completions`
//! (SSE streaming ending in `data: [DONE]`, `stream_options.include_usage`, logprobs, `n`
//! samples and lists of prompts — one engine sequence each, submitted together, choice `index`
//! = prompt × n + sample, sample `i` seeded with `seed + i` —, completions' `echo`, and vLLM's
//! `prompt_logprobs`),
//! `GET /v1/models`, `GET /health` (503 while loading), `GET /metrics` (Prometheus text), and
//! vLLM's `POST /tokenize` (`prompt` or chat `messages` → `{count, max_model_len, tokens,
//! token_strs}`) and `POST /detokenize` (`tokens` → `{prompt}`).
//!
//! Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}` for every status
//! the server sends: 400 for malformed JSON or parameters (negative or too large `max_tokens`,
//! prompt too long, invalid UTF-8, too many stop strings), 401 without the API key, 403 for a
//! foreign origin or `Host`, 404 for an unknown model or route, 405, 408 / 413 for a body too
//! slow or too large, 429 when the queue is full, 503 while loading or shutting down.
//! `x-request-id` is echoed, names the response (`cmpl-ID`) and is logged (stderr, with the
//! engine's id); the engine's id of every request is random, so clients' ids never collide.

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

use super::{check_stops, random_id, AppState, Input};
use crate::engine::{
    EngineHandle, Event, Finished, GenerateRequest, PromptLogprob, SubmitError, Submitted,
    TokenLogprob, MAX_TOP_LOGPROBS,
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
        error_response(self.status, self.message, self.param)
    }
}

/// OpenAI's error JSON for `status` (the `type` as the OpenAI client libraries name it).
pub fn error_response(status: StatusCode, message: String, param: Option<&str>) -> Response {
    let kind = match status {
        StatusCode::BAD_REQUEST => "BadRequestError",
        StatusCode::UNAUTHORIZED => "AuthenticationError",
        StatusCode::FORBIDDEN => "PermissionDeniedError",
        StatusCode::NOT_FOUND => "NotFoundError",
        StatusCode::CONFLICT => "ConflictError",
        StatusCode::UNPROCESSABLE_ENTITY => "UnprocessableEntityError",
        StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
        s if s.is_client_error() => "BadRequestError",
        _ => "InternalServerError",
    };
    let body = json!({"error": {
        "message": message,
        "type": kind,
        "param": param,
        "code": status.as_u16(),
    }});
    (status, Json(body)).into_response()
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
    /// vLLM's: each prompt token's logprob, rank and this many most likely (0..=20).
    prompt_logprobs: Option<i64>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    /// vLLM's: each prompt token's logprob, rank and this many most likely (0..=20).
    prompt_logprobs: Option<i64>,
    #[serde(flatten)]
    common: Common,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::bad("the request body is not valid UTF-8"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// [`parse`], on a blocking thread for a large body (so that parsing megabytes of JSON never
/// holds an async worker that `/health` needs).
async fn parse_body<T: for<'de> Deserialize<'de> + Send + 'static>(
    state: &AppState,
    body: Bytes,
) -> Result<T, ApiError> {
    if body.len() <= 64 << 10 {
        return parse(&body);
    }
    state
        .heavy(body.len(), move || parse(&body))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?
}

fn engine(state: &AppState) -> Result<&EngineHandle, ApiError> {
    state
        .engine()
        .map_err(|u| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, u.to_string()))
}

/// The engine when it takes new requests (503 while loading or draining).
fn admitting(state: &AppState) -> Result<&EngineHandle, ApiError> {
    state
        .admitting()
        .map_err(|u| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, u.to_string()))
}

/// Sampling parameters and `max_tokens` from the shared fields.
fn sampling(c: &Common) -> Result<(SamplingParams, Option<usize>), ApiError> {
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
    let stop_ids = c.stop_token_ids.as_deref().unwrap_or_default();
    check_stops(&stop_strings, stop_ids).map_err(|e| ApiError::bad(e.to_string()).param("stop"))?;
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

/// The checks of a JSON body that need no model, for the fuzz targets: `route` 0
/// completions, 1 chat, 2 tokenize, 3 detokenize. `Ok` when accepted or refused with a 4xx;
/// `Err` for anything else.
pub fn check_body(route: u8, body: &[u8]) -> Result<(), String> {
    let r: Result<(), ApiError> = (|| {
        match route % 4 {
            0 => {
                let r: CompletionRequest = parse(body)?;
                sampling(&r.common)?;
                if let Prompt::Texts(v) = &r.prompt {
                    if v.is_empty() {
                        return Err(ApiError::bad("prompt is an empty list"));
                    }
                }
            }
            1 => {
                let r: ChatRequest = parse(body)?;
                chat_messages(r.messages)?;
                sampling(&r.common)?;
            }
            2 => {
                let r: TokenizeRequest = parse(body)?;
                if let Some(m) = r.messages {
                    chat_messages(m)?;
                }
            }
            _ => {
                let _: DetokenizeRequest = parse(body)?;
            }
        }
        Ok(())
    })();
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.status.is_client_error() => Ok(()),
        Err(e) => Err(format!("{}: {}", e.status, e.message)),
    }
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

/// One prompt of a request, tokenized.
struct PromptIn {
    ids: Vec<u32>,
    /// The text `echo` puts before each of its choices' text (completions).
    echo: Option<String>,
}

/// What a handler needs to answer one request: its prompts, each sampled `n` times — choice
/// `c` is sample `c % n` of prompt `c / n` (OpenAI's and vLLM's order).
struct Job {
    api: Api,
    state: AppState,
    id: String,
    created: u64,
    stream: bool,
    include_usage: bool,
    logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs` (non-streaming only).
    prompt_logprobs: Option<usize>,
    prompts: Vec<PromptIn>,
    n: usize,
}

/// The options of a request beyond the shared sampling fields.
struct Extras {
    logprobs: Option<usize>,
    prompt_logprobs: Option<i64>,
    echo: bool,
    n: Option<u32>,
}

/// What has arrived for one choice.
#[derive(Default)]
struct ChoiceState {
    text: String,
    lps: Vec<TokenLogprob>,
    prompt_lps: Vec<PromptLogprob>,
    /// Streaming: its first chunk (role, echoed prompt) went out.
    started: bool,
}

fn token_text(tok: Option<&Tokenizer>, id: u32) -> String {
    tok.and_then(|t| t.decode(&[id], false).ok())
        .unwrap_or_else(|| format!("<{id}>"))
}

/// OpenAI's completions `top_logprobs` entry: token text → log-probability.
fn top_map(tok: Option<&Tokenizer>, top: &[(u32, f64)]) -> Value {
    let mut m = serde_json::Map::new();
    for &(t, lp) in top {
        m.insert(token_text(tok, t), json!(lp));
    }
    Value::Object(m)
}

/// The `logprobs` object of a choice (completions: parallel arrays, led by the echoed prompt's
/// tokens when `echo` gives them — the first prompt token with `null` entries, as OpenAI; chat:
/// a `content` list).
fn logprobs_json(
    api: Api,
    tok: Option<&Tokenizer>,
    echo: Option<(&[u32], &[PromptLogprob])>,
    lps: &[TokenLogprob],
) -> Value {
    match api {
        Api::Completion => {
            let (mut tokens, mut token_logprobs, mut top) = (Vec::new(), Vec::new(), Vec::new());
            if let Some((ids, plps)) = echo {
                for (i, &id) in ids.iter().enumerate() {
                    tokens.push(token_text(tok, id));
                    match i.checked_sub(1).and_then(|j| plps.get(j)) {
                        Some(p) => {
                            token_logprobs.push(json!(p.logprob.logprob));
                            top.push(top_map(tok, &p.logprob.top));
                        }
                        None => {
                            token_logprobs.push(Value::Null);
                            top.push(Value::Null);
                        }
                    }
                }
            }
            for l in lps {
                tokens.push(token_text(tok, l.token));
                token_logprobs.push(json!(l.logprob));
                top.push(top_map(tok, &l.top));
            }
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

/// vLLM's `prompt_logprobs`: `null` for the first prompt token, then per token a map token id →
/// `{logprob, rank, decoded_token}` holding the prompt token and the `top` most likely.
fn prompt_logprobs_json(tok: Option<&Tokenizer>, plps: &[PromptLogprob], top: usize) -> Value {
    let entry = |t: u32, logprob: f64, rank: usize| json!({"logprob": logprob, "rank": rank, "decoded_token": token_text(tok, t)});
    let mut out = vec![Value::Null];
    for p in plps {
        let mut m = serde_json::Map::new();
        let l = &p.logprob;
        m.insert(l.token.to_string(), entry(l.token, l.logprob, p.rank));
        for (i, &(t, lp)) in l.top.iter().take(top).enumerate() {
            m.entry(t.to_string())
                .or_insert_with(|| entry(t, lp, i + 1));
        }
        out.push(Value::Object(m));
    }
    Value::Array(out)
}

/// Usage of the finished choices: each prompt counted once, every choice's completion tokens.
fn usage(n: usize, finished: &[Option<Finished>]) -> Value {
    let (mut prompt, mut completion) = (0, 0);
    for (c, f) in finished.iter().enumerate() {
        if let Some(f) = f {
            if c % n == 0 {
                prompt += f.prompt_tokens;
            }
            completion += f.completion_tokens;
        }
    }
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// The events of all of a request's sequences as one stream of `(choice index, event)`, in
/// arrival order. Dropping it drops every receiver, which aborts them all.
fn merged_events(subs: Vec<Submitted>) -> impl futures_util::Stream<Item = (usize, Event)> {
    futures_util::stream::select_all(
        subs.into_iter()
            .enumerate()
            .map(|(c, s)| UnboundedReceiverStream::new(s.events).map(move |e| (c, e))),
    )
}

impl Job {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completion, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }

    fn prompt_of(&self, choice: usize) -> &PromptIn {
        &self.prompts[choice / self.n]
    }

    /// The echoed prompt's tokens and their logprobs, when `echo` and `logprobs` are both asked.
    fn echo_logprobs<'a>(
        &'a self,
        choice: usize,
        plps: &'a [PromptLogprob],
    ) -> Option<(&'a [u32], &'a [PromptLogprob])> {
        let p = self.prompt_of(choice);
        p.echo.as_ref().map(|_| (&p.ids[..], plps))
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
        index: usize,
        text: &str,
        lps: Option<Value>,
        finish: Option<&Finished>,
        first: bool,
    ) -> Value {
        let mut c = match self.api {
            Api::Completion => json!({"index": index, "text": text}),
            Api::Chat => {
                let mut delta = json!({"content": text});
                if first {
                    delta["role"] = json!("assistant");
                }
                json!({"index": index, "delta": delta})
            }
        };
        c["logprobs"] = lps.unwrap_or(Value::Null);
        c["finish_reason"] = finish.map_or(Value::Null, |f| json!(f.reason.as_str()));
        if let Some(f) = finish {
            c["stop_reason"] = json!(f.stop_reason);
        }
        c
    }

    /// The finished choice `c` of a non-streaming response.
    fn full_choice(
        &self,
        tok: Option<&Tokenizer>,
        c: usize,
        st: &ChoiceState,
        f: &Finished,
    ) -> Value {
        let p = self.prompt_of(c);
        let text = format!("{}{}{}", p.echo.as_deref().unwrap_or(""), st.text, f.text);
        let mut choice = match self.api {
            Api::Completion => json!({"index": c, "text": text}),
            Api::Chat => json!({
                "index": c,
                "message": {"role": "assistant", "content": text},
            }),
        };
        choice["logprobs"] = self.logprobs.map_or(Value::Null, |_| {
            logprobs_json(
                self.api,
                tok,
                self.echo_logprobs(c, &st.prompt_lps),
                &st.lps,
            )
        });
        choice["finish_reason"] = json!(f.reason.as_str());
        choice["stop_reason"] = json!(f.stop_reason);
        if let (Api::Completion, Some(top)) = (self.api, self.prompt_logprobs) {
            choice["prompt_logprobs"] = prompt_logprobs_json(tok, &st.prompt_lps, top);
        }
        choice
    }
}

/// Submits every sequence together and answers (streaming or not).
async fn run(
    mut job: Job,
    reqs: Vec<GenerateRequest>,
    base_id: String,
    headers_id: Option<String>,
) -> Result<Response, ApiError> {
    let engine = engine(&job.state)?.clone();
    let subs = engine.submit_all(reqs)?;
    let id = base_id;
    job.id = match job.api {
        Api::Completion => format!("cmpl-{id}"),
        Api::Chat => format!("chatcmpl-{id}"),
    };
    let mut response = if job.stream {
        stream_response(job, engine, subs)
    } else {
        full_response(job, engine, subs).await?
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
    subs: Vec<Submitted>,
) -> Result<Response, ApiError> {
    let k = job.choices();
    let mut states: Vec<ChoiceState> = (0..k).map(|_| ChoiceState::default()).collect();
    let mut finished: Vec<Option<Finished>> = vec![None; k];
    let mut left = k;
    let mut events = merged_events(subs);
    while let Some((c, ev)) = events.next().await {
        match ev {
            Event::Tokens(t) => {
                let st = &mut states[c];
                st.text.push_str(&t.text);
                st.lps.extend(t.logprobs);
                st.prompt_lps.extend(t.prompt_logprobs);
            }
            Event::Finished(f) => {
                if let Some(e) = &f.error {
                    return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.clone()));
                }
                finished[c] = Some(f);
                left -= 1;
                if left == 0 {
                    break;
                }
            }
        }
    }
    if left > 0 {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the engine stopped before the request finished",
        ));
    }
    let tok = engine.tokenizer();
    let choices: Vec<Value> = states
        .iter()
        .zip(&finished)
        .enumerate()
        .filter_map(|(c, (st, f))| Some(job.full_choice(tok, c, st, f.as_ref()?)))
        .collect();
    let mut body = job.wrap(Value::Array(choices), usage(job.n, &finished));
    if let (Api::Chat, Some(top)) = (job.api, job.prompt_logprobs) {
        body["prompt_logprobs"] = prompt_logprobs_json(tok, &states[0].prompt_lps, top);
    }
    Ok(Json(body).into_response())
}

/// SSE: the chunks of all choices interleaved as they come, each with its choice `index` (an
/// echoed prompt first, then text deltas, then one chunk with the finish reason), the usage
/// chunk once all finished (`include_usage`), then `[DONE]`.
fn stream_response(job: Job, engine: EngineHandle, subs: Vec<Submitted>) -> Response {
    let k = job.choices();
    let mut states: Vec<ChoiceState> = (0..k).map(|_| ChoiceState::default()).collect();
    let mut finished: Vec<Option<Finished>> = vec![None; k];
    let (mut left, mut failed) = (k, false);
    let frames = merged_events(subs).flat_map(move |(c, ev)| {
        let tok = engine.tokenizer();
        let mut out: Vec<String> = Vec::new();
        let st = &mut states[c];
        // The first chunk of a choice carries the echoed prompt (and its logprobs).
        let first = !st.started;
        if first {
            st.started = true;
            if let Some(echo) = &job.prompt_of(c).echo {
                let plps = match &ev {
                    Event::Tokens(t) => &t.prompt_logprobs[..],
                    Event::Finished(_) => &[],
                };
                let lp = job
                    .logprobs
                    .map(|_| logprobs_json(job.api, tok, job.echo_logprobs(c, plps), &[]));
                let ch = job.chunk_choice(c, echo, lp, None, false);
                out.push(job.wrap(json!([ch]), Value::Null).to_string());
            }
        }
        match ev {
            Event::Tokens(t) => {
                let lp = job
                    .logprobs
                    .map(|_| logprobs_json(job.api, tok, None, &t.logprobs));
                let ch = job.chunk_choice(c, &t.text, lp, None, first);
                out.push(job.wrap(json!([ch]), Value::Null).to_string());
            }
            Event::Finished(f) => {
                if let Some(e) = &f.error {
                    failed = true;
                    out.push(
                        json!({"error": {"message": e, "type": "InternalServerError",
                            "code": 500, "index": c}})
                        .to_string(),
                    );
                } else {
                    let ch = job.chunk_choice(c, &f.text, None, Some(&f), first);
                    out.push(job.wrap(json!([ch]), Value::Null).to_string());
                }
                finished[c] = Some(f);
                left -= 1;
                if left == 0 {
                    if job.include_usage && !failed {
                        out.push(job.wrap(json!([]), usage(job.n, &finished)).to_string());
                    }
                    out.push("[DONE]".to_string());
                }
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
    let mut r: CompletionRequest = parse_body(&state, body).await?;
    check_model(&state, &r.common)?;
    let engine = admitting(&state)?;
    let inputs: Vec<Input> = match r.prompt {
        Prompt::Text(t) => vec![Input::Text(t)],
        Prompt::Tokens(t) => vec![Input::Tokens(t)],
        Prompt::Texts(v) => v.into_iter().map(Input::Text).collect(),
        Prompt::TokenLists(v) => v.into_iter().map(Input::Tokens).collect(),
    };
    if inputs.is_empty() {
        return Err(ApiError::bad("prompt is an empty list").param("prompt"));
    }
    let extras = Extras {
        logprobs: r.logprobs.map(|n| n as usize),
        prompt_logprobs: r.prompt_logprobs,
        echo: r.echo.unwrap_or(false),
        n: r.common.n.take(),
    };
    submit(
        state.clone(),
        engine,
        Api::Completion,
        &headers,
        inputs,
        &r.common,
        extras,
    )
    .await
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut r: ChatRequest = parse_body(&state, body).await?;
    check_model(&state, &r.common)?;
    let engine = admitting(&state)?;
    let msgs = chat_messages(r.messages)?;
    let logprobs = match (r.logprobs, r.top_logprobs) {
        (Some(true), n) => Some(n.unwrap_or(0) as usize),
        (_, Some(n)) if n > 0 => {
            return Err(ApiError::bad("top_logprobs needs logprobs: true").param("top_logprobs"))
        }
        _ => None,
    };
    let extras = Extras {
        logprobs,
        prompt_logprobs: r.prompt_logprobs,
        echo: false,
        n: r.common.n.take(),
    };
    submit(
        state.clone(),
        engine,
        Api::Chat,
        &headers,
        vec![Input::Chat(msgs)],
        &r.common,
        extras,
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
    let r: TokenizeRequest = parse_body(&state, body).await?;
    check_model_name(&state, r.model.as_deref())?;
    let engine = engine(&state)?.clone();
    tokenizer_of(&engine)?;
    let msgs = r.messages.map(chat_messages).transpose()?;
    let max_context = engine.info().max_context;
    state
        .blocking(move || {
            tokenize_body(
                &engine,
                r.prompt,
                msgs,
                r.add_special_tokens,
                r.add_generation_prompt,
                r.return_token_strs,
                max_context,
            )
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?
}

/// `/tokenize`'s work (on a blocking thread).
fn tokenize_body(
    engine: &EngineHandle,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    return_token_strs: Option<bool>,
    max_context: usize,
) -> Result<Json<Value>, ApiError> {
    let tok = tokenizer_of(engine)?;
    let tokens = match (prompt, messages) {
        (Some(p), None) => tok
            .encode(&p, add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::bad(format!("tokenizing the prompt: {e}")).param("prompt"))?,
        (None, Some(msgs)) => {
            if msgs.is_empty() {
                return Err(ApiError::bad("messages is empty").param("messages"));
            }
            let text = tok
                .apply_chat_template(&msgs, add_generation_prompt.unwrap_or(true))
                .map_err(|e| {
                    ApiError::bad(format!("applying the chat template: {e}")).param("messages")
                })?;
            tok.encode(&text, add_special_tokens.unwrap_or(false))
                .map_err(|e| ApiError::bad(format!("tokenizing the chat: {e}")).param("messages"))?
        }
        _ => return Err(ApiError::bad("give either `prompt` or `messages`")),
    };
    let token_strs = match return_token_strs {
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
        "max_model_len": max_context,
        "tokens": tokens,
        "token_strs": token_strs,
    })))
}

async fn detokenize_route(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let r: DetokenizeRequest = parse_body(&state, body).await?;
    check_model_name(&state, r.model.as_deref())?;
    let engine = engine(&state)?.clone();
    tokenizer_of(&engine)?;
    let vocab = engine.info().vocab_size;
    if let Some(t) = r.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad(format!(
            "token {t} is outside the vocabulary (size {vocab})"
        ))
        .param("tokens"));
    }
    let text = state
        .blocking(move || {
            tokenizer_of(&engine)?
                .decode(&r.tokens, false)
                .map_err(|e| ApiError::bad(format!("detokenizing: {e}")).param("tokens"))
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))??;
    Ok(Json(json!({ "prompt": text })))
}

/// Checks a request's options, tokenizes its prompts and runs `n` sequences per prompt.
async fn submit(
    state: AppState,
    engine: &EngineHandle,
    api: Api,
    headers: &HeaderMap,
    inputs: Vec<Input>,
    common: &Common,
    extras: Extras,
) -> Result<Response, ApiError> {
    let logprobs = extras.logprobs;
    if logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(
            ApiError::bad(format!("at most {MAX_TOP_LOGPROBS} top logprobs per token"))
                .param("logprobs"),
        );
    }
    let spec = engine.info().spec_block_size.is_some();
    let stream = common.stream.unwrap_or(false);
    let prompt_logprobs = match extras.prompt_logprobs {
        None => None,
        Some(p) if (0..=MAX_TOP_LOGPROBS as i64).contains(&p) => Some(p as usize),
        Some(p) => {
            return Err(ApiError::bad(format!(
                "prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {p}"
            ))
            .param("prompt_logprobs"))
        }
    };
    if prompt_logprobs.is_some() && stream {
        return Err(
            ApiError::bad("prompt_logprobs are not available when stream is true")
                .param("prompt_logprobs"),
        );
    }
    // With echo, the prompt tokens' logprobs lead the choice's logprobs.
    let echo_logprobs = logprobs.filter(|_| extras.echo);
    if (prompt_logprobs.is_some() || echo_logprobs.is_some()) && spec {
        return Err(ApiError::bad(
            "prompt logprobs are not available with speculative decoding on this server",
        )
        .param("prompt_logprobs"));
    }
    let n = match extras.n {
        None => 1,
        Some(0) => return Err(ApiError::bad("n must be at least 1").param("n")),
        Some(n) => n as usize,
    };
    let k = inputs.len().saturating_mul(n);
    let max = engine.config().max_waiting;
    if k > max {
        return Err(ApiError::bad(format!(
            "n × prompts = {k} sequences; this server takes at most {max} per request \
             (its queue bound, --max-waiting)"
        ))
        .param("n"));
    }
    let (params, max_tokens) = sampling(common)?;
    let header_id = request_id(headers)?;
    let mut prompts = Vec::with_capacity(inputs.len());
    for input in inputs {
        let echo_text = match (extras.echo, &input) {
            (true, Input::Text(t)) => Some(t.clone()),
            _ => None,
        };
        let ids = state.tokenize(engine, input).await?;
        let echo = match (extras.echo, echo_text) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => {
                let e = engine.clone();
                let ids = ids.clone();
                Some(
                    state
                        .blocking(move || {
                            tokenizer_of(&e).and_then(|t| {
                                t.decode(&ids, false).map_err(|e| {
                                    ApiError::bad(format!("detokenizing the prompt: {e}"))
                                })
                            })
                        })
                        .await
                        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?
                        .map_err(|e| e.param("echo"))?,
                )
            }
        };
        prompts.push(PromptIn { ids, echo });
    }
    let include_usage = common
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    // The engine ids are random (a client's x-request-id only names the response), so no
    // client can collide with another's; several sequences are `<id>-<choice>`.
    let base_id = random_id();
    if !header_id.is_empty() {
        // The client's id is visible ASCII (checked above): one line, no control characters.
        eprintln!("ultra serve: request {base_id}: x-request-id {header_id}");
    }
    let want_prompt = prompt_logprobs.max(echo_logprobs);
    let mut reqs = Vec::with_capacity(k);
    for p in &prompts {
        for i in 0..n {
            reqs.push(GenerateRequest {
                id: if k == 1 {
                    base_id.clone()
                } else {
                    format!("{base_id}-{}", reqs.len())
                },
                prompt: p.ids.clone(),
                // Sample i of a prompt: seed + i (vLLM's rule), so sample 0 is the n = 1 answer.
                params: SamplingParams {
                    seed: params.seed.map(|s| s.wrapping_add(i as u64)),
                    ..params.clone()
                },
                max_tokens,
                logprobs,
                prompt_logprobs: want_prompt,
            });
        }
    }
    let job = Job {
        api,
        state,
        id: String::new(),
        created: unix_now(),
        stream,
        include_usage: stream && include_usage,
        logprobs,
        prompt_logprobs,
        prompts,
        n,
    };
    let shown = if header_id.is_empty() {
        base_id.clone()
    } else {
        header_id.clone()
    };
    run(
        job,
        reqs,
        shown,
        (!header_id.is_empty()).then_some(header_id),
    )
    .await
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
    if state.front().is_draining() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Shutting down").into_response();
    }
    match state.engine() {
        Ok(e) if !e.is_draining() => {
            (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
        }
        Ok(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Shutting down").into_response(),
        Err(u) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, u.to_string()).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state.front().metrics.render();
    if let Ok(e) = state.engine() {
        text.push_str(&e.metrics().render());
    }
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
        // The connection layer (`conn`) already enforced `--max-request-bytes` before the body got
        // here; axum's own default (2 MiB, an undocumented fixed limit) must not apply again.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}
