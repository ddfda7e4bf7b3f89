//! The gRPC services over [`Mesh`]: registry, config, discovery, status.
//! Each checks the admin credential where it must, runs slow work (compiling
//! a component, configuring plugins) off the async runtime, and maps a
//! refusal to its gRPC status.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use wasmesh_api::proto;
use wasmesh_api::proto::{
    config_server::Config, discovery_server::Discovery, registry_server::Registry,
    status_server::Status as StatusService,
};

use crate::auth::{Access, Auth};
use crate::mesh::{MAX_COMPONENT_BYTES, Mesh, ProxyHandle, Refusal};
use crate::metrics::Metrics;
use crate::tls::{PeerCert, Transport};

/// Largest chunk of a push or a fetch.
pub const CHUNK: usize = 1 << 20;
/// How long a push may wait for its next message before it is dropped.
const STALL: Duration = Duration::from_secs(30);

/// The services' shared state.
#[derive(Clone)]
pub struct Services {
    /// The mesh.
    pub mesh: Arc<Mesh>,
    /// The admin credential.
    pub auth: Arc<Auth>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("control failed: {e}")))?
        .map_err(Status::from)
}

fn plugin_message(m: crate::store::PluginMeta, used_by: Vec<String>) -> proto::Plugin {
    proto::Plugin {
        name: m.name,
        version: m.version,
        sha256: m.sha256,
        size: m.size,
        hooks: m.hooks,
        pushed_at_ms: m.pushed_at_ms,
        used_by,
    }
}

impl Services {
    /// Read a push: its header, then its chunks, each within [`STALL`].
    async fn read_push(
        stream: &mut Streaming<proto::PushRequest>,
    ) -> Result<(String, String, Vec<u8>), Status> {
        async fn next(
            s: &mut Streaming<proto::PushRequest>,
        ) -> Result<Option<proto::PushRequest>, Status> {
            tokio::time::timeout(STALL, s.message())
                .await
                .map_err(|_| Status::deadline_exceeded("the push stalled: no data for 30s"))?
        }
        let header = match next(stream).await?.and_then(|m| m.part) {
            Some(proto::push_request::Part::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "a push starts with its header (name, version, size)",
                ));
            }
        };
        if header.size > MAX_COMPONENT_BYTES {
            return Err(Status::invalid_argument(format!(
                "{}@{}: {} bytes is over the {MAX_COMPONENT_BYTES}-byte limit for a component",
                header.name, header.version, header.size
            )));
        }
        let mut bytes = Vec::with_capacity(header.size as usize);
        while let Some(m) = next(stream).await? {
            match m.part {
                Some(proto::push_request::Part::Chunk(c)) if c.len() <= CHUNK => {
                    bytes.extend_from_slice(&c);
                    if bytes.len() as u64 > header.size {
                        return Err(Status::invalid_argument(
                            "the push sent more bytes than its header said",
                        ));
                    }
                }
                Some(proto::push_request::Part::Chunk(_)) => {
                    return Err(Status::invalid_argument("a push chunk is at most 1 MiB"));
                }
                _ => return Err(Status::invalid_argument("a push has one header")),
            }
        }
        if bytes.len() as u64 != header.size {
            return Err(Status::invalid_argument(format!(
                "the push ended after {} of its {} bytes",
                bytes.len(),
                header.size
            )));
        }
        Ok((header.name, header.version, bytes))
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::Chunk, Status>> + Send>>;
type SnapshotStream = Pin<Box<dyn Stream<Item = Result<proto::ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Registry for Services {
    async fn push(
        &self,
        req: Request<Streaming<proto::PushRequest>>,
    ) -> Result<Response<proto::Plugin>, Status> {
        self.auth.check(&req, Access::Write)?;
        let mut stream = req.into_inner();
        let read = Self::read_push(&mut stream).await;
        let result = match read {
            Ok((name, version, bytes)) => {
                let mesh = self.mesh.clone();
                blocking(move || mesh.push(&name, &version, &bytes)).await
            }
            Err(e) => Err(e),
        };
        Metrics::count(&self.mesh.metrics.pushes, result.is_ok());
        let meta = result?;
        tracing::info!(plugin = %meta.key(), sha256 = %meta.sha256, "plugin pushed");
        Ok(Response::new(plugin_message(meta, Vec::new())))
    }

    async fn list_plugins(
        &self,
        req: Request<proto::ListPluginsRequest>,
    ) -> Result<Response<proto::ListPluginsResponse>, Status> {
        self.auth.check(&req, Access::Read)?;
        let plugins = self
            .mesh
            .plugins()
            .into_iter()
            .map(|(m, u)| plugin_message(m, u))
            .collect();
        Ok(Response::new(proto::ListPluginsResponse { plugins }))
    }

    async fn get_plugin(
        &self,
        req: Request<proto::PluginRef>,
    ) -> Result<Response<proto::Plugin>, Status> {
        self.auth.check(&req, Access::Read)?;
        let r = req.into_inner();
        let (m, u) = self.mesh.plugin(&format!("{}@{}", r.name, r.version))?;
        Ok(Response::new(plugin_message(m, u)))
    }

    async fn delete_plugin(
        &self,
        req: Request<proto::PluginRef>,
    ) -> Result<Response<proto::DeletePluginResponse>, Status> {
        self.auth.check(&req, Access::Write)?;
        let r = req.into_inner();
        let mesh = self.mesh.clone();
        blocking(move || mesh.delete_plugin(&format!("{}@{}", r.name, r.version))).await?;
        Ok(Response::new(proto::DeletePluginResponse {}))
    }

    type FetchStream = ChunkStream;

    async fn fetch(
        &self,
        req: Request<proto::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let sha = req.into_inner().sha256.to_ascii_lowercase();
        let mesh = self.mesh.clone();
        let s = sha.clone();
        let bytes = blocking(move || mesh.component(&s))
            .await?
            .ok_or_else(|| Status::not_found(format!("no component has sha256 {sha}")))?;
        let chunks: Vec<Result<proto::Chunk, Status>> = bytes
            .chunks(CHUNK)
            .map(|c| Ok(proto::Chunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

#[tonic::async_trait]
impl Config for Services {
    async fn apply(
        &self,
        req: Request<proto::ApplyRequest>,
    ) -> Result<Response<proto::ApplyResponse>, Status> {
        self.auth.check(&req, Access::Write)?;
        let sources: Vec<(String, String)> = req
            .into_inner()
            .sources
            .into_iter()
            .map(|d| {
                let origin = if d.origin.is_empty() {
                    "(apply)".to_string()
                } else {
                    d.origin
                };
                (origin, d.yaml)
            })
            .collect();
        let mesh = self.mesh.clone();
        let result = blocking(move || mesh.apply(&sources)).await;
        Metrics::count(&self.mesh.metrics.applies, result.is_ok());
        let (revision, services) = result?;
        tracing::info!(revision, services = ?services, "config applied");
        Ok(Response::new(proto::ApplyResponse { revision, services }))
    }

    async fn list_services(
        &self,
        req: Request<proto::ListServicesRequest>,
    ) -> Result<Response<proto::ListServicesResponse>, Status> {
        self.auth.check(&req, Access::Read)?;
        let (revision, records) = self.mesh.services();
        let services = records.into_iter().map(resource).collect();
        Ok(Response::new(proto::ListServicesResponse {
            revision,
            services,
        }))
    }

    async fn get_service(
        &self,
        req: Request<proto::ServiceRef>,
    ) -> Result<Response<proto::ServiceResource>, Status> {
        self.auth.check(&req, Access::Read)?;
        let name = req.into_inner().name;
        let (_, records) = self.mesh.services();
        records
            .into_iter()
            .find(|r| r.name == name)
            .map(|r| Response::new(resource(r)))
            .ok_or_else(|| Status::not_found(format!("no service {name:?} is applied")))
    }

    async fn delete_service(
        &self,
        req: Request<proto::ServiceRef>,
    ) -> Result<Response<proto::DeleteServiceResponse>, Status> {
        self.auth.check(&req, Access::Write)?;
        let name = req.into_inner().name;
        let mesh = self.mesh.clone();
        let revision = blocking(move || mesh.delete_service(&name)).await?;
        Ok(Response::new(proto::DeleteServiceResponse { revision }))
    }
}

fn resource(r: crate::store::ServiceRecord) -> proto::ServiceResource {
    proto::ServiceResource {
        spec_yaml: serde_yaml_ng::to_string(&r.spec).unwrap_or_default(),
        name: r.name,
        namespace: r.namespace,
        revision: r.revision,
    }
}

#[tonic::async_trait]
impl Discovery for Services {
    type StreamStream = SnapshotStream;

    async fn stream(
        &self,
        req: Request<Streaming<proto::ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = match Transport::of(&req) {
            Transport::Plain => None,
            Transport::Tls(info) => Some(info.peer.ok_or_else(|| {
                Status::unauthenticated(
                    "discovery over TLS needs the proxy's mesh certificate: a proxy gets one with its join token first",
                )
            })?),
        };
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(proto::ProxyMessage {
                message: Some(proto::proxy_message::Message::Hello(h)),
            }) if !h.service.is_empty() && !h.instance.is_empty() => h,
            _ => {
                return Err(Status::invalid_argument(
                    "a discovery stream starts with Hello, naming the service and the instance",
                ));
            }
        };
        if let Some(p) = &peer
            && p.id.service() != Some(hello.service.as_str())
        {
            return Err(Status::permission_denied(format!(
                "this proxy's certificate is {}; it cannot stand beside service {}",
                p.id, hello.service
            )));
        }
        let mesh = self.mesh.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(serve_proxy(mesh, hello, peer, inbound, tx));
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out)))
    }
}

/// One proxy's stream: send its snapshot now (unless it serves it
/// already) and after every change that alters it; record its replies;
/// when the stream ends, the proxy is gone.
async fn serve_proxy(
    mesh: Arc<Mesh>,
    hello: proto::Hello,
    peer: Option<PeerCert>,
    mut inbound: Streaming<proto::ProxyMessage>,
    tx: tokio::sync::mpsc::Sender<Result<proto::ControlMessage, Status>>,
) {
    let mut changes = mesh.subscribe();
    let mut announced = mesh.announcements();
    let mut sent = hello.applied_version.clone();
    let handle: ProxyHandle = mesh.connect(hello, peer.as_ref());
    loop {
        let snapshot = mesh.snapshot(&handle.service);
        if snapshot.version != sent {
            sent = snapshot.version.clone();
            let msg = proto::ControlMessage {
                snapshot: Some((*snapshot).clone()),
                prefetch: None,
            };
            if tx.send(Ok(msg)).await.is_err() {
                break;
            }
        }
        tokio::select! {
            m = inbound.next() => match m {
                Some(Ok(proto::ProxyMessage { message: Some(proto::proxy_message::Message::Ack(a)) })) => {
                    mesh.reply(&handle, &a.version, &a.error);
                }
                Some(Ok(proto::ProxyMessage { message: Some(proto::proxy_message::Message::Certificate(c)) })) => {
                    mesh.certificate(&handle, &c);
                }
                Some(Ok(proto::ProxyMessage { message: Some(proto::proxy_message::Message::Edges(r)) })) => {
                    mesh.edges(&handle, r);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            r = changes.changed() => if r.is_err() { break },
            a = announced.recv() => match a {
                Ok(a) if a.concerns(&mesh.snapshot(&handle.service)) => {
                    let msg = proto::ControlMessage { snapshot: None, prefetch: Some(a.message.clone()) };
                    if tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                }
                // Missed announcements only cost their proxies the head start.
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    mesh.disconnect(&handle);
}

#[tonic::async_trait]
impl StatusService for Services {
    async fn proxies(
        &self,
        req: Request<proto::ProxiesRequest>,
    ) -> Result<Response<proto::ProxiesResponse>, Status> {
        self.auth.check(&req, Access::Read)?;
        Ok(Response::new(self.mesh.status()))
    }

    async fn top(
        &self,
        req: Request<proto::TopRequest>,
    ) -> Result<Response<proto::TopResponse>, Status> {
        self.auth.check(&req, Access::Read)?;
        let window = Duration::from_millis(req.get_ref().window_ms);
        Ok(Response::new(self.mesh.top(window)))
    }
}
