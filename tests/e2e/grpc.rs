//! A real gRPC call (tonic client and server, prost messages) through the
//! proxy, including an error status carried in trailers.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::server::{NamedService, UnaryService};
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;

use crate::support::*;

#[derive(Clone, PartialEq, prost::Message)]
struct HelloRequest {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HelloReply {
    #[prost(string, tag = "1")]
    message: String,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The server half of `test.Greeter`, written out as tonic's codegen would.
#[derive(Clone)]
struct Greeter;

impl NamedService for Greeter {
    const NAME: &'static str = "test.Greeter";
}

struct SayHello;

impl UnaryService<HelloRequest> for SayHello {
    type Response = HelloReply;
    type Future = BoxFuture<Result<Response<HelloReply>, Status>>;
    fn call(&mut self, req: Request<HelloRequest>) -> Self::Future {
        Box::pin(async move {
            let name = req.into_inner().name;
            if name == "nobody" {
                return Err(Status::not_found("no such person: nobody"));
            }
            Ok(Response::new(HelloReply {
                message: format!("hello {name}"),
            }))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for Greeter
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match req.uri().path() {
            "/test.Greeter/SayHello" => Box::pin(async move {
                let mut grpc =
                    tonic::server::Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default());
                Ok(grpc.unary(SayHello, req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

async fn say_hello(channel: tonic::transport::Channel, name: &str) -> Result<String, Status> {
    let mut client = tonic::client::Grpc::new(channel);
    client
        .ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/test.Greeter/SayHello");
    let resp: Response<HelloReply> = client
        .unary(
            Request::new(HelloRequest { name: name.into() }),
            path,
            ProstCodec::<HelloRequest, HelloReply>::default(),
        )
        .await?;
    Ok(resp.into_inner().message)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_call_passes_through_with_its_status() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        Server::builder()
            .add_service(Greeter)
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    // No `protocol`: a gRPC request goes upstream as HTTP/2 by default.
    let proxy = Proxy::start(&format!(
        r#"services:
  greeter:
    endpoints: {{ v1: ["{addr}"] }}
    plugins:
      - source: builtin:add-header
        config: {{ request: {{ x-through: mesh }} }}
"#
    ))
    .await;
    let channel = Endpoint::from_shared(format!("http://{}", proxy.listen))
        .unwrap()
        .origin("http://greeter".parse().unwrap())
        .connect()
        .await
        .unwrap();
    assert_eq!(
        say_hello(channel.clone(), "mesh").await.unwrap(),
        "hello mesh"
    );
    let err = say_hello(channel, "nobody").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no such person: nobody");
    proxy.metrics_containing(r#"wasmesh_requests_total{destination_service="greeter",response_code="200",response_flags="-"} 2"#).await;
    server.abort();
}

/// A `Stream` of accepted connections for tonic's `serve_with_incoming`.
fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}
