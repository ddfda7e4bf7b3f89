//! The demo's mesh: control embedded in this process (its data in a
//! temporary directory), the apps in this process too, and a sidecar per
//! app instance — each a real `wasmesh proxy` process of this executable,
//! with a join token, so every hop between sidecars is mutual TLS.
//!
//! Nothing outlives the demo: [`Mesh::shutdown`] stops every sidecar (and
//! waits for it), and each sidecar also asks the kernel to end it when the
//! demo's process dies however it dies ([`exit_with_parent`]).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use tokio::net::TcpListener;
use wasmesh_api::proto;

use super::apps::{App, HttpClient, Role, client};
use crate::control_cmd::{Clients, Target};

/// The environment variable naming the process a sidecar ends with.
pub const PARENT_ENV: &str = "WASMESH_DEMO_PARENT";

/// In a sidecar the demo started (`WASMESH_DEMO_PARENT` set): ask the
/// kernel for SIGTERM when the demo's process ends, and exit at once if it
/// already has. The demo spawns sidecars from its main thread, which lives
/// as long as the process (the signal follows the thread that forked).
pub fn exit_with_parent() {
    let Some(parent) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Signal, getppid, set_parent_process_death_signal};
        let _ = set_parent_process_death_signal(Some(Signal::TERM));
        if getppid().map(|p| p.as_raw_nonzero().get()) != Some(parent) {
            std::process::exit(1);
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago, for a sidecar or
/// control to listen on. Taken from 10000–14999, below Linux's ephemeral
/// range (32768–60999): with port 0 an outgoing connection of this or
/// another process could take it between this check and the sidecar's bind.
/// Handed out in turn from a per-process starting point, each checked free.
fn free_addr() -> anyhow::Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 5_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 97) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if let Ok(l) = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            return Ok(l.local_addr()?);
        }
    }
    bail!("no free port on 127.0.0.1 from {LOW} to {}", LOW + SPAN - 1)
}

/// One sidecar process.
pub struct Sidecar {
    /// Its service.
    pub service: &'static str,
    /// Its subset.
    pub subset: &'static str,
    /// Outbound listener: its app's (or the generator's) way into the mesh.
    pub listen: SocketAddr,
    /// Admin listener (`/metrics`, `/ready`).
    pub admin: SocketAddr,
    /// Inbound (mTLS) listener, for a sidecar with an app.
    pub inbound: Option<SocketAddr>,
    /// Its log.
    pub log: PathBuf,
    child: Child,
}

/// The running mesh.
pub struct Mesh {
    /// Where everything is kept.
    pub dir: PathBuf,
    /// The CLI's way to control.
    pub target: Target,
    /// Control's TLS listener (sidecars), gRPC listener (the CLI).
    pub control_tls: SocketAddr,
    /// The sidecars, in start order.
    pub sidecars: Vec<Sidecar>,
    /// The apps.
    pub apps: Vec<App>,
    control_stop: Option<tokio::sync::oneshot::Sender<()>>,
    control_task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    http: HttpClient,
}

impl Mesh {
    /// Start control with its data in `dir/control`.
    pub async fn start_control(dir: &Path) -> anyhow::Result<Mesh> {
        let data = dir.join("control");
        let (listen, admin, tls) = (free_addr()?, free_addr()?, free_addr()?);
        let validator = Arc::new(crate::validator::RuntimeValidator::new(
            crate::compiler(),
            wasmesh_artifacts::BUILTINS,
            Some(&data.join("compile-cache")),
        )?);
        let options = wasmesh_control::Options {
            listen,
            admin,
            data_dir: Some(data.clone()),
            store: None,
            store_key_file: None,
            etcd: Default::default(),
            admin_token_file: None,
            insecure: false,
            endpoint_grace: wasmesh_control::DEFAULT_ENDPOINT_GRACE,
            listen_tls: tls,
            identity: wasmesh_control::identity::IdentityOptions {
                trust_domain: wasmesh_api::spiffe::DEFAULT_TRUST_DOMAIN
                    .parse()
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                ca_files: None,
                cert_ttl: wasmesh_control::identity::DEFAULT_CERT_TTL,
                server_names: vec!["localhost".into()],
                server_ips: vec![Ipv4Addr::LOCALHOST.into()],
            },
        };
        let control = wasmesh_control::Control::start(options, validator).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(control.run_until(async {
            let _ = stopped.await;
        }));
        Ok(Mesh {
            dir: dir.to_path_buf(),
            target: Target {
                control: format!("http://{listen}"),
                admin_token_file: Some(data.join("admin.token")),
            },
            control_tls: tls,
            sidecars: Vec::new(),
            apps: Vec::new(),
            control_stop: Some(stop),
            control_task: Some(task),
            http: client(),
        })
    }

    /// The CLI's clients of control.
    pub async fn clients(&self) -> anyhow::Result<Clients> {
        self.target
            .connect()
            .await
            .map_err(|f| anyhow::anyhow!("{}", f.message()))
    }

    /// Apply `yaml` (origin `what`): the new revision.
    pub async fn apply(&self, what: &str, yaml: &str) -> anyhow::Result<u64> {
        let mut c = self.clients().await?;
        let r = c
            .config
            .apply(proto::ApplyRequest {
                sources: vec![proto::Documents {
                    origin: what.to_string(),
                    yaml: yaml.to_string(),
                }],
            })
            .await
            .map_err(|s| anyhow::anyhow!("control refused {what}: {}", s.message()))?;
        Ok(r.into_inner().revision)
    }

    /// Wait until every connected sidecar has applied the latest
    /// configuration: how many there are.
    pub async fn wait_rollout(&self, within: Duration) -> anyhow::Result<usize> {
        let mut c = self.clients().await?;
        let deadline = Instant::now() + within;
        loop {
            let list = proxies(&mut c).await?;
            if let Some(p) = list
                .iter()
                .find(|p| !p.nacked_version.is_empty() && p.nacked_version == p.latest_version)
            {
                bail!(
                    "the sidecar {}/{} refused the configuration: {}",
                    p.service,
                    p.instance,
                    p.nack_reason
                );
            }
            let pending = list
                .iter()
                .filter(|p| p.applied_version != p.latest_version)
                .count();
            if pending == 0 && list.len() >= self.sidecars.len() {
                return Ok(list.len());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{pending} of {} sidecars had not applied the configuration after {within:?}",
                    list.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Each connected sidecar's service and SPIFFE identity.
    pub async fn identities(&self) -> anyhow::Result<Vec<(String, String)>> {
        let list = proxies(&mut self.clients().await?).await?;
        Ok(list.into_iter().map(|p| (p.service, p.spiffe_id)).collect())
    }

    /// Start `role`'s app and its sidecar (with a join token), or a sidecar
    /// without an app (`role` `None`: the traffic generator's, `loadgen`).
    pub async fn add(&mut self, role: Option<Role>) -> anyhow::Result<()> {
        let (service, subset) = role.map_or(("loadgen", "v1"), |r| (r.service(), r.subset()));
        let token = {
            let mut c = self.clients().await?;
            c.identity
                .create_token(proto::CreateTokenRequest {
                    service: service.to_string(),
                    namespace: wasmesh_api::resources::DEFAULT_NAMESPACE.to_string(),
                    ttl_ms: 3_600_000,
                    uses: 1,
                })
                .await
                .map_err(|s| anyhow::anyhow!("creating a join token: {}", s.message()))?
                .into_inner()
                .token
        };
        let (listen, admin) = (free_addr()?, free_addr()?);
        let mut app = None;
        let mut inbound = None;
        if let Some(role) = role {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            app = Some(App::start(role, listener, listen)?);
            inbound = Some(free_addr()?);
        }
        let log = self.dir.join(format!("{service}-{subset}.log"));
        let mut cmd = Command::new(std::env::current_exe().context("finding this executable")?);
        cmd.args(["proxy", "--control"])
            .arg(format!("https://{}", self.control_tls))
            .args(["--service", service, "--subset", subset])
            .args(["--instance", &format!("{service}-{subset}")])
            .args([
                "--listen",
                &listen.to_string(),
                "--admin",
                &admin.to_string(),
            ])
            .args(["--workers", "1", "--drain", "2s"])
            // One compile cache for all, as one node's sidecars share one:
            // each plugin is compiled once, by whichever sidecar gets to it
            // first, and mapped by the others.
            .arg("--compile-cache")
            .arg(self.dir.join("compile-cache"));
        if let (Some(app), Some(inbound)) = (&app, inbound) {
            cmd.args(["--app", &app.addr.to_string()])
                .args(["--inbound", &inbound.to_string()]);
        }
        let child = cmd
            .env("WASMESH_TOKEN", token)
            .env(PARENT_ENV, std::process::id().to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&log)
                    .with_context(|| format!("creating {}", log.display()))?,
            )
            .spawn()
            .context("starting a sidecar")?;
        self.apps.extend(app);
        self.sidecars.push(Sidecar {
            service,
            subset,
            listen,
            admin,
            inbound,
            log,
            child,
        });
        Ok(())
    }

    /// Wait until every sidecar answers `/ready`.
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        for i in 0..self.sidecars.len() {
            loop {
                let s = &mut self.sidecars[i];
                if let Ok(Some(status)) = s.child.try_wait() {
                    bail!(
                        "the sidecar of {} {} exited ({status}):\n{}",
                        s.service,
                        s.subset,
                        tail(&s.log, 15)
                    );
                }
                let ready = format!("http://{}/ready", s.admin);
                if self.get(&ready).await.is_ok_and(|(code, _)| code == 200) {
                    break;
                }
                if Instant::now() >= deadline {
                    let s = &self.sidecars[i];
                    bail!(
                        "the sidecar of {} {} was not ready after {within:?}:\n{}",
                        s.service,
                        s.subset,
                        tail(&s.log, 15)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// `GET url`: (status, body).
    pub async fn get(&self, url: &str) -> anyhow::Result<(u16, String)> {
        self.send(Request::get(url).body(Full::default())?).await
    }

    /// Send `req`: (status, body).
    pub async fn send(&self, req: Request<Full<bytes::Bytes>>) -> anyhow::Result<(u16, String)> {
        let r = tokio::time::timeout(Duration::from_secs(10), self.http.request(req))
            .await
            .context("no answer within 10 s")??;
        let status = r.status().as_u16();
        let body = r.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// The sidecar of `service` `subset`.
    pub fn sidecar(&self, service: &str, subset: &str) -> &Sidecar {
        self.sidecars
            .iter()
            .find(|s| s.service == service && s.subset == subset)
            .expect("a sidecar the demo started")
    }

    /// The app of `role`.
    pub fn app(&self, role: Role) -> &App {
        self.apps
            .iter()
            .find(|a| a.role == role)
            .expect("an app the demo started")
    }

    /// Every sidecar's `/metrics`, joined.
    pub async fn metrics(&self) -> String {
        let mut all = String::new();
        for s in &self.sidecars {
            if let Ok((200, text)) = self.get(&format!("http://{}/metrics", s.admin)).await {
                all.push_str(&text);
            }
        }
        all
    }

    /// Stop everything: the sidecars (SIGTERM, then SIGKILL after 5 s), then
    /// control and the apps. Waits for each process to be gone.
    pub async fn shutdown(&mut self) {
        for s in &self.sidecars {
            terminate(&s.child);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for s in &mut self.sidecars {
            while matches!(s.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if matches!(s.child.try_wait(), Ok(None)) {
                let _ = s.child.kill();
            }
            let _ = s.child.wait();
        }
        self.sidecars.clear();
        self.apps.clear();
        if let Some(stop) = self.control_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.control_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// Control's status of every connected sidecar.
async fn proxies(c: &mut Clients) -> anyhow::Result<Vec<proto::ProxyStatus>> {
    Ok(c.status
        .proxies(proto::ProxiesRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("asking control for status: {}", s.message()))?
        .into_inner()
        .proxies)
}

/// SIGTERM to `child`.
fn terminate(child: &Child) {
    #[cfg(unix)]
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// The last `n` lines of `file`, indented.
pub fn tail(file: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The sum of `name`'s samples in a scrape whose labels include all of
/// `labels`, grouped by the value of the label `by`.
pub fn sum_by(text: &str, name: &str, labels: &[(&str, &str)], by: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((set, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let has = |k: &str, v: &str| set.contains(&format!("{k}=\"{v}\""));
        if !labels.iter().all(|(k, v)| has(k, v)) {
            continue;
        }
        let key = set
            .split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{by}=\"")))
            .map(|v| v.trim_end_matches('"').to_string())
            .unwrap_or_default();
        *out.entry(key).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    out
}
