//! # serve — Ultra's front door
//!
//! Owns what users touch: the `ultra` command-line tool and, as the engine grows, the request
//! scheduler (continuous batching), the gRPC service (`proto/`), the OpenAI-compatible HTTP API
//! and the metrics. Today the CLI runs the MXFP4 expert benchmark ([`fp4_bench`]) — the job that
//! exists before the model executors land — and lists the GPUs (`ultra devices`).

pub mod commands;
pub mod engine;
pub mod fp4_bench;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod stream;
