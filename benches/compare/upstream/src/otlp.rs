//! `bench-otlp ADDR`: an OTLP/gRPC trace receiver that accepts every
//! export and keeps nothing but a count of spans (on stderr after each
//! export). The collector the telemetry benchmark's proxies export to.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// An OTLP trace sink.
#[derive(Parser)]
struct Args {
    /// Where to listen, e.g. 127.0.0.1:19150.
    addr: SocketAddr,
}

#[derive(Default, Clone)]
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        let total = self.spans.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        eprintln!("spans received: {total}");
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Sink::default()))
            .serve(args.addr)
            .await
            .expect("serving OTLP");
    });
}
