//! The `ultra` subcommands, one module each; `src/bin/ultra.rs` only parses arguments.

pub mod bench_decode;
pub mod bench_prefix;
pub mod bench_serve;
pub mod bench_shapes;
pub mod bench_spec;
pub mod devices;
pub mod generate;
pub mod inspect;
pub mod quantize;
pub mod serve;
