//! The control plane's gRPC API, generated from
//! `proto/wasmesh/control/v1/control.proto` (prost and tonic, compiled with
//! protox by the build script: no `protoc` needed).

#![allow(missing_docs, reason = "generated code")]
#![allow(clippy::all, reason = "generated code")]

tonic::include_proto!("wasmesh.control.v1");

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("control_descriptor");
