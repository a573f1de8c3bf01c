//! The gRPC service `ultra.v1.Engine` (tonic), with `grpc.health.v1` and server reflection.
//! Codes as `proto/ultra/v1/engine.proto` says: a message that is not valid protobuf (or has
//! invalid UTF-8 in a string) is `INVALID_ARGUMENT` ([`Codec`]); request ids live in the
//! caller's connection's namespace, so `Abort` reaches only the caller's own requests.

use std::pin::Pin;

use anyhow::Result;
use futures_util::{Stream, StreamExt};
use model::sampling::SamplingParams;
use model::tokenizer::ChatMessage;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic::{Request, Response, Status};

use super::conn::ConnInfo;
use super::{check_stops, random_id, AppState, Input, Unavailable};
use crate::engine::{
    EngineHandle, Event, Finished, GenerateRequest as EngineRequest, SubmitError, TokenEvent,
};
use crate::proto::v1 as pb;
use crate::proto::v1::engine_server::{Engine, EngineServer};

/// The `ultra.v1.Engine` implementation.
#[derive(Clone)]
pub struct GrpcService {
    state: AppState,
}

impl GrpcService {
    pub fn new(state: AppState) -> Self {
        GrpcService { state }
    }

    fn engine(&self) -> Result<&EngineHandle, Status> {
        self.state.engine().map_err(unavailable)
    }

    /// The engine when it takes new requests.
    fn admitting(&self) -> Result<&EngineHandle, Status> {
        self.state.admitting().map_err(unavailable)
    }
}

/// The prost codec, except that a message that does not decode is `INVALID_ARGUMENT` (the
/// client's fault), not `INTERNAL`. The generated code uses it (`crates/serve/build.rs`).
#[derive(Debug)]
pub struct Codec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(tonic_prost::ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(self.0.decoder())
    }
}

/// [`Codec`]'s decoder.
#[derive(Debug)]
pub struct Decoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: prost::Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            if s.code() == tonic::Code::Internal {
                Status::invalid_argument(format!(
                    "the request is not a valid protobuf message: {}",
                    s.message()
                ))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The engine id of a request `id` from connection `conn`.
fn engine_id(conn: Option<&ConnInfo>, id: &str) -> String {
    format!("g{}:{id}", conn.map_or(0, |c| c.id))
}

fn unavailable(u: Unavailable) -> Status {
    Status::unavailable(u.to_string())
}

/// The status a refused submission maps to.
pub fn submit_status(e: SubmitError) -> Status {
    match e {
        SubmitError::Invalid(m) | SubmitError::TooLong(m) => Status::invalid_argument(m),
        e @ SubmitError::QueueFull(_) => Status::resource_exhausted(e.to_string()),
        e @ SubmitError::ShuttingDown => Status::unavailable(e.to_string()),
    }
}

/// A `GenerateRequest` checked and converted, before tokenization.
#[derive(Debug)]
pub struct Converted {
    /// The id the client sees (its own, or a random one).
    pub visible_id: String,
    pub model: String,
    pub input: Input,
    pub params: SamplingParams,
    pub max_tokens: Option<usize>,
    pub logprobs: Option<usize>,
}

/// Checks a request's fields that need no engine (input present, stop limits, sampling
/// parameters) and converts it.
pub fn convert(r: pb::GenerateRequest) -> Result<Converted, Status> {
    let input = match r.input {
        Some(pb::generate_request::Input::Text(t)) => Input::Text(t),
        Some(pb::generate_request::Input::TokenIds(t)) => Input::Tokens(t.ids),
        Some(pb::generate_request::Input::Chat(c)) => Input::Chat(chat(c)),
        None => return Err(Status::invalid_argument("give text, token_ids or chat")),
    };
    let s = r.sampling.unwrap_or_default();
    check_stops(&s.stop, &s.stop_token_ids).map_err(submit_status)?;
    let defaults = SamplingParams::default();
    let params = SamplingParams {
        temperature: s.temperature.unwrap_or(defaults.temperature),
        top_k: s.top_k.map(|k| k as usize),
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty.unwrap_or(defaults.presence_penalty),
        frequency_penalty: s.frequency_penalty.unwrap_or(defaults.frequency_penalty),
        seed: s.seed,
        max_tokens: defaults.max_tokens,
        stop_token_ids: s.stop_token_ids,
        stop_strings: s.stop,
        ignore_eos: s.ignore_eos.unwrap_or(false),
    };
    params
        .validate()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if s.max_tokens == Some(0) {
        return Err(Status::invalid_argument("max_tokens must be at least 1"));
    }
    Ok(Converted {
        visible_id: if r.request_id.is_empty() {
            random_id()
        } else {
            r.request_id
        },
        model: r.model,
        input,
        params,
        max_tokens: s.max_tokens.map(|m| m as usize),
        logprobs: r.logprobs.map(|n| n as usize),
    })
}

/// Checks the request and turns it into the engine's (tokenized off the async runtime); the
/// engine id is the visible id (the client's, or a random one) in the connection's namespace.
async fn engine_request(
    state: &AppState,
    engine: &EngineHandle,
    conn: Option<&ConnInfo>,
    r: pb::GenerateRequest,
) -> Result<(String, EngineRequest), Status> {
    let c = convert(r)?;
    if !c.model.is_empty() && c.model != state.model_id() {
        return Err(Status::not_found(format!(
            "the model `{}` does not exist (this server serves `{}`)",
            c.model,
            state.model_id()
        )));
    }
    let prompt = state
        .tokenize(engine, c.input)
        .await
        .map_err(submit_status)?;
    Ok((
        c.visible_id.clone(),
        EngineRequest {
            id: engine_id(conn, &c.visible_id),
            prompt,
            params: c.params,
            max_tokens: c.max_tokens,
            logprobs: c.logprobs,
            prompt_logprobs: None,
        },
    ))
}

/// The engine's refusal, with the namespaced id put back as the client sent it.
fn refused(e: SubmitError, engine_id: &str, visible: &str) -> Status {
    let e = match e {
        SubmitError::Invalid(m) => SubmitError::Invalid(m.replace(engine_id, visible)),
        e => e,
    };
    submit_status(e)
}

fn chat(c: pb::Chat) -> Vec<ChatMessage> {
    c.messages
        .into_iter()
        .map(|m| ChatMessage::new(m.role, m.content))
        .collect()
}

fn logprobs(ev: &TokenEvent) -> Vec<pb::TokenLogprob> {
    ev.logprobs
        .iter()
        .map(|l| pb::TokenLogprob {
            token_id: l.token,
            logprob: l.logprob,
            top: l
                .top
                .iter()
                .map(|&(token_id, logprob)| pb::TopLogprob { token_id, logprob })
                .collect(),
        })
        .collect()
}

fn complete(f: &Finished) -> pb::Complete {
    pb::Complete {
        finish_reason: f.reason.as_str().to_string(),
        stop_cause: f.cause.clone(),
        usage: Some(pb::Usage {
            prompt_tokens: f.prompt_tokens as u32,
            completion_tokens: f.completion_tokens as u32,
            total_tokens: (f.prompt_tokens + f.completion_tokens) as u32,
        }),
        timing: Some(pb::Timing {
            queue_ns: f.queue.as_nanos() as u64,
            time_to_first_token_ns: f.time_to_first_token.map_or(0, |d| d.as_nanos() as u64),
            e2e_ns: f.e2e.as_nanos() as u64,
        }),
        spec: f.spec.as_ref().map(|s| pb::SpecStats {
            drafts: s.drafts,
            draft_tokens: s.draft_tokens,
            accepted_tokens: s.accepted_tokens,
            mean_acceptance_length: s.mean_acceptance_length(),
            accepted_per_position: s.accepted_per_position.clone(),
        }),
        error: f.error.clone().unwrap_or_default(),
    }
}

/// One engine event as a stream message.
fn response(id: &str, ev: Event) -> pb::GenerateResponse {
    let event = match ev {
        Event::Tokens(t) => pb::generate_response::Event::Chunk(pb::Chunk {
            logprobs: logprobs(&t),
            token_ids: t.tokens,
            text: t.text,
            draft_tokens: t.draft_tokens,
            accepted_draft_tokens: t.accepted_draft_tokens,
        }),
        Event::Finished(f) => {
            // Text released at the end (held back, or flushed on abort) rides in a last chunk
            // only when there is some; the Complete itself carries no text.
            pb::generate_response::Event::Complete(complete(&f))
        }
    };
    pb::GenerateResponse {
        request_id: id.to_string(),
        event: Some(event),
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Engine for GrpcService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let engine = self.admitting()?;
        let conn = req.extensions().get::<ConnInfo>().copied();
        let (id, r) = engine_request(&self.state, engine, conn.as_ref(), req.into_inner()).await?;
        let eid = r.id.clone();
        let sub = engine.submit(r).map_err(|e| refused(e, &eid, &id))?;
        // Dropping this stream (client gone) drops the receiver: the engine aborts the request.
        let stream = UnboundedReceiverStream::new(sub.events).flat_map(move |ev| {
            let mut out = Vec::with_capacity(2);
            if let Event::Finished(f) = &ev {
                if !f.text.is_empty() {
                    out.push(Ok(response(
                        &id,
                        Event::Tokens(TokenEvent {
                            tokens: Vec::new(),
                            text: f.text.clone(),
                            logprobs: Vec::new(),
                            prompt_logprobs: Vec::new(),
                            draft_tokens: 0,
                            accepted_draft_tokens: 0,
                        }),
                    )));
                }
            }
            out.push(Ok(response(&id, ev)));
            futures_util::stream::iter(out)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn complete(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let engine = self.admitting()?;
        let conn = req.extensions().get::<ConnInfo>().copied();
        let (id, r) = engine_request(&self.state, engine, conn.as_ref(), req.into_inner()).await?;
        let eid = r.id.clone();
        let mut sub = engine.submit(r).map_err(|e| refused(e, &eid, &id))?;
        let mut out = pb::CompleteResponse {
            request_id: id,
            ..Default::default()
        };
        while let Some(ev) = sub.events.recv().await {
            match ev {
                Event::Tokens(t) => {
                    out.logprobs.extend(logprobs(&t));
                    out.token_ids.extend(t.tokens);
                    out.text.push_str(&t.text);
                }
                Event::Finished(f) => {
                    out.text.push_str(&f.text);
                    out.complete = Some(complete(&f));
                    return Ok(Response::new(out));
                }
            }
        }
        Err(Status::internal(
            "the engine stopped before the request finished",
        ))
    }

    async fn abort(
        &self,
        req: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        // Only the caller's own requests: the id is looked up in its connection's namespace.
        let conn = req.extensions().get::<ConnInfo>().copied();
        let id = engine_id(conn.as_ref(), &req.into_inner().request_id);
        let found = self.engine()?.abort(&id);
        Ok(Response::new(pb::AbortResponse { found }))
    }

    async fn tokenize(
        &self,
        req: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let engine = self.engine()?;
        let r = req.into_inner();
        if engine.tokenizer().is_none() {
            return Err(Status::failed_precondition("the model has no tokenizer"));
        }
        let token_ids = match r.input {
            Some(pb::tokenize_request::Input::Text(t)) => {
                let special = r.add_special_tokens.unwrap_or(true);
                let e = engine.clone();
                self.state
                    .blocking(move || {
                        e.tokenizer()
                            .map(|tok| tok.encode(&t, special).map_err(|e| e.to_string()))
                    })
                    .await
                    .map_err(Status::internal)?
                    .unwrap_or_else(|| Err("the model has no tokenizer".into()))
                    .map_err(Status::invalid_argument)?
            }
            Some(pb::tokenize_request::Input::Chat(c)) => self
                .state
                .tokenize(engine, Input::Chat(chat(c)))
                .await
                .map_err(submit_status)?,
            None => return Err(Status::invalid_argument("give text or chat")),
        };
        Ok(Response::new(pb::TokenizeResponse { token_ids }))
    }

    async fn detokenize(
        &self,
        req: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let engine = self.engine()?;
        let r = req.into_inner();
        let Some(tok) = engine.tokenizer() else {
            return Err(Status::failed_precondition("the model has no tokenizer"));
        };
        let vocab = engine.info().vocab_size;
        if let Some(t) = r.token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Status::invalid_argument(format!(
                "token {t} is outside the vocabulary (size {vocab})"
            )));
        }
        let _ = tok;
        let e = engine.clone();
        let skip = r.skip_special_tokens.unwrap_or(true);
        let text = self
            .state
            .blocking(move || {
                e.tokenizer()
                    .map(|tok| tok.decode(&r.token_ids, skip).map_err(|e| e.to_string()))
            })
            .await
            .map_err(Status::internal)?
            .unwrap_or_else(|| Err("the model has no tokenizer".into()))
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }

    async fn get_model_info(
        &self,
        _req: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let engine = self.engine()?;
        let i = engine.info();
        let tok = engine.tokenizer();
        Ok(Response::new(pb::ModelInfo {
            model_id: i.model_id.clone(),
            architecture: i.architecture.clone(),
            vocab_size: i.vocab_size as u32,
            max_context_length: i.max_context as u32,
            num_layers: i.num_layers as u32,
            eos_token_ids: i.eos_token_ids.clone(),
            has_tokenizer: tok.is_some(),
            has_chat_template: tok.is_some_and(|t| t.has_chat_template()),
            speculative: i.spec_block_size.is_some(),
            block_size: i.spec_block_size.unwrap_or(0) as u32,
            device: i.device.clone(),
            max_running_requests: i.max_running as u32,
        }))
    }
}

/// `ultra.v1.Engine` (requests up to `--max-request-bytes`), health and reflection as one
/// routing service (the connection layer serves it).
pub fn routes(
    state: AppState,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<tonic::service::Routes> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let max = state.front().limits.max_request_bytes;
    let engine = EngineServer::new(GrpcService::new(state)).max_decoding_message_size(max);
    Ok(tonic::service::Routes::new(health)
        .add_service(reflection)
        .add_service(engine)
        .prepare())
}
