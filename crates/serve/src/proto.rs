//! The generated gRPC code of `proto/ultra/v1/engine.proto` (package `ultra.v1`) and the encoded
//! descriptor set that server reflection serves.

#![allow(clippy::all, missing_docs)]

/// Package `ultra.v1`.
pub mod v1 {
    tonic::include_proto!("ultra.v1");
}

/// The encoded `FileDescriptorSet` of the API (for `tonic-reflection`).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ultra_v1_descriptor");
