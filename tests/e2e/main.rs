//! End-to-end tests: a real `wasmesh proxy` process, real upstream servers on
//! 127.0.0.1, real clients (hyper HTTP/1.1 and h2c, tonic gRPC, raw TCP), real
//! plugins compiled to wasm. One test binary, a module per area.

mod cli;
mod control;
mod demo;
mod deploy;
#[cfg(feature = "etcd")]
mod etcd;
mod grpc;
mod guide;
mod hardening;
mod http;
mod layers;
mod mtls;
mod plugins;
mod reload;
mod request;
mod stock;
mod support;
mod telemetry;
