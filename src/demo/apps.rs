//! The demo's applications, bookinfo's shape in a few lines each:
//! `productpage` calls `details` and `reviews`; `reviews` v2 and v3 call
//! `ratings`, v1 does not. Each is a real HTTP/1.1 server on 127.0.0.1 that
//! calls the others through its own sidecar's outbound listener (the
//! `Host` header names the service), forwarding the `end-user` header as
//! bookinfo does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;

/// An HTTP/1.1 client, as each app and the traffic generator use.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client with a pool, for calls through a sidecar.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Which app, and what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Calls details and reviews; the page a user asks for.
    ProductPage,
    /// A book's details.
    Details,
    /// A book's reviews: v1 without stars, v2 black stars, v3 red ones.
    Reviews(u8),
    /// The stars.
    Ratings,
}

impl Role {
    /// Its service's name.
    pub fn service(self) -> &'static str {
        match self {
            Self::ProductPage => "productpage",
            Self::Details => "details",
            Self::Reviews(_) => "reviews",
            Self::Ratings => "ratings",
        }
    }
    /// Its subset.
    pub fn subset(self) -> &'static str {
        match self {
            Self::Reviews(2) => "v2",
            Self::Reviews(3) => "v3",
            _ => "v1",
        }
    }
}

/// One running app.
pub struct App {
    /// What it is.
    pub role: Role,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Answer every request with 503 (a bad release), until cleared.
    pub broken: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    role: Role,
    /// Its sidecar's outbound listener.
    outbound: SocketAddr,
    client: HttpClient,
    broken: Arc<AtomicBool>,
}

impl App {
    /// Bind `listener` and serve `role`, calling peers through `outbound`.
    pub fn start(role: Role, listener: TcpListener, outbound: SocketAddr) -> std::io::Result<App> {
        let addr = listener.local_addr()?;
        let broken = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State {
            role,
            outbound,
            client: client(),
            broken: broken.clone(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(App {
            role,
            addr,
            broken,
            task,
        })
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let user = req
        .headers()
        .get("end-user")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if state.broken.load(Ordering::Relaxed) {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": format!("{} {} is broken", state.role.service(), state.role.subset()) }),
        );
    }
    match state.role {
        Role::Details => reply(
            StatusCode::OK,
            json!({ "author": "William Shakespeare", "year": 1595, "pages": 200 }),
        ),
        Role::Ratings => reply(StatusCode::OK, json!({ "stars": 5 })),
        Role::Reviews(1) => reply(StatusCode::OK, json!({ "version": "v1" })),
        Role::Reviews(v) => {
            let color = if v == 2 { "black" } else { "red" };
            let version = format!("v{v}");
            match call(state, "ratings", "/ratings/0", user.as_deref()).await {
                Ok((200, body)) => reply(
                    StatusCode::OK,
                    json!({ "version": version, "color": color, "stars": body["stars"] }),
                ),
                // Bookinfo's reviews shows the page without stars.
                Ok((status, _)) => reply(
                    StatusCode::OK,
                    json!({ "version": version, "ratings": format!("unavailable ({status})") }),
                ),
                Err(e) => reply(
                    StatusCode::OK,
                    json!({ "version": version, "ratings": format!("unavailable ({e})") }),
                ),
            }
        }
        Role::ProductPage => {
            let (details, reviews) = tokio::join!(
                call(state, "details", "/details/0", user.as_deref()),
                call(state, "reviews", "/reviews/0", user.as_deref()),
            );
            match (details, reviews) {
                (Ok((200, details)), Ok((200, reviews))) => reply(
                    StatusCode::OK,
                    json!({ "user": user, "details": details, "reviews": reviews }),
                ),
                (d, r) => {
                    let why = |what: &str, r: Result<(u16, serde_json::Value), String>| match r {
                        Ok((200, _)) => None,
                        Ok((status, _)) => Some(format!("{what} answered {status}")),
                        Err(e) => Some(format!("{what}: {e}")),
                    };
                    let errors: Vec<String> = [why("details", d), why("reviews", r)]
                        .into_iter()
                        .flatten()
                        .collect();
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({ "error": errors.join("; ") }),
                    )
                }
            }
        }
    }
}

/// `GET path` of `service` through the app's sidecar: (status, JSON body).
async fn call(
    state: &State,
    service: &str,
    path: &str,
    user: Option<&str>,
) -> Result<(u16, serde_json::Value), String> {
    let mut req = Request::get(format!("http://{}{path}", state.outbound)).header("host", service);
    if let Some(u) = user {
        req = req.header("end-user", u);
    }
    let req = req.body(Full::default()).map_err(|e| e.to_string())?;
    let resp = state
        .client
        .request(req)
        .await
        .map_err(|e| format!("calling {service}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading {service}'s answer: {e}"))?
        .to_bytes();
    Ok((
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    ))
}
