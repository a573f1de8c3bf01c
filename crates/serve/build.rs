//! Compiles `proto/ultra/v1/*.proto` with protox (pure Rust: no `protoc` needed) into tonic
//! client/server code, and writes the encoded descriptor set for server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = root.join("ultra/v1/engine.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("ultra_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Undecodable requests are INVALID_ARGUMENT, as the proto says (not prost's INTERNAL).
        .codec_path("crate::server::grpc::Codec")
        .compile_fds(fds)?;
    Ok(())
}
