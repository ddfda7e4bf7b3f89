//! The CLI's side of the control API: `push`, `apply`, `get`, `delete`,
//! `status`, `token create`. Each talks to `--control` (default `$WASMESH_CONTROL`, else
//! `http://127.0.0.1:15010`) with the admin credential from
//! `--admin-token-file` (or `$WASMESH_ADMIN_TOKEN_FILE`).
//!
//! Exit codes: 0 done; 1 a runtime failure or a refusal by control; 2 the
//! caller's input (a bad file, a bad component, a plugin refusing its
//! configuration).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use wasmesh_api::proto;
use wasmesh_api::proto::config_client::ConfigClient;
use wasmesh_api::proto::identity_client::IdentityClient;
use wasmesh_api::proto::registry_client::RegistryClient;
use wasmesh_api::proto::status_client::StatusClient;

/// Where control is and how to prove the caller is its admin.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// Control's gRPC address.
    #[arg(
        long,
        env = "WASMESH_CONTROL",
        default_value = "http://127.0.0.1:15010"
    )]
    pub control: String,
    /// The admin token file control wrote (admin.token in its data
    /// directory).
    #[arg(long, env = "WASMESH_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// Output format of `get`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    /// Columns for a person.
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// A failure and its exit code.
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// What went wrong, for a person.
    pub fn message(&self) -> &str {
        &self.message
    }
    fn input(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
    fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let code = if s.code() == Code::InvalidArgument {
            2
        } else {
            1
        };
        let what = match s.code() {
            Code::Unavailable => "control is unreachable",
            Code::Unauthenticated | Code::PermissionDenied => "not allowed",
            Code::InvalidArgument => "refused",
            Code::NotFound => "not found",
            Code::AlreadyExists => "refused",
            Code::FailedPrecondition => "refused",
            Code::Aborted => "conflict",
            _ => "control failed",
        };
        Self {
            code,
            message: format!("{what}: {}", s.message()),
        }
    }
}

/// Run a command and turn its failure into an exit code.
pub fn finish(r: Result<(), Failure>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// Adds the admin credential to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The clients of one control plane.
pub struct Clients {
    pub registry: RegistryClient<Authed>,
    pub config: ConfigClient<Authed>,
    pub status: StatusClient<Authed>,
    pub identity: IdentityClient<Authed>,
}

impl Target {
    /// Connect, with the credential if one is given.
    pub async fn connect(&self) -> Result<Clients, Failure> {
        let bearer = match &self.admin_token_file {
            None => None,
            Some(f) => {
                let token = std::fs::read_to_string(f).map_err(|e| {
                    Failure::input(format!("cannot read the admin token {}: {e}", f.display()))
                })?;
                Some(
                    format!("Bearer {}", token.trim())
                        .parse()
                        .map_err(|_| Failure::input(format!("{} is not a token", f.display())))?,
                )
            }
        };
        let channel = tonic::transport::Endpoint::from_shared(self.control.clone())
            .map_err(|e| Failure::input(format!("--control {}: {e}", self.control)))?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .map_err(|e| {
                Failure::runtime(format!(
                    "control is unreachable at {}: {e}; is `wasmesh control` running there?",
                    self.control
                ))
            })?;
        let b = Bearer(bearer);
        Ok(Clients {
            registry: RegistryClient::with_interceptor(channel.clone(), b.clone())
                .max_decoding_message_size(2 << 20),
            config: ConfigClient::with_interceptor(channel.clone(), b.clone()),
            status: StatusClient::with_interceptor(channel.clone(), b.clone()),
            identity: IdentityClient::with_interceptor(channel, b),
        })
    }
}

/// `wasmesh push FILE --name N --version V`: prints `N@V SHA256`.
pub async fn push(target: &Target, file: &Path, name: &str, version: &str) -> Result<(), Failure> {
    let bytes = std::fs::read(file)
        .map_err(|e| Failure::input(format!("cannot read {}: {e}", file.display())))?;
    let mut c = target.connect().await?;
    let plugin = push_bytes(&mut c, bytes, name, version).await?;
    println!("{}@{} {}", plugin.name, plugin.version, plugin.sha256);
    Ok(())
}

/// Push `bytes` in 1 MiB chunks, with a progress bar when it takes time.
pub async fn push_bytes(
    c: &mut Clients,
    bytes: Vec<u8>,
    name: &str,
    version: &str,
) -> Result<proto::Plugin, Failure> {
    use std::io::IsTerminal as _;
    let bar = (std::io::stderr().is_terminal() && bytes.len() > (4 << 20)).then(|| {
        let b = indicatif::ProgressBar::new(bytes.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("pushing {bytes}/{total_bytes} {wide_bar}")
                .expect("a valid template"),
        );
        b
    });
    let header = proto::PushRequest {
        part: Some(proto::push_request::Part::Header(proto::PushHeader {
            name: name.to_string(),
            version: version.to_string(),
            size: bytes.len() as u64,
        })),
    };
    let chunks: Vec<Vec<u8>> = bytes.chunks(1 << 20).map(<[u8]>::to_vec).collect();
    let progress = bar.clone();
    let messages = std::iter::once(header).chain(chunks.into_iter().map(move |c| {
        if let Some(b) = &progress {
            b.inc(c.len() as u64);
        }
        proto::PushRequest {
            part: Some(proto::push_request::Part::Chunk(c)),
        }
    }));
    let r = c.registry.push(tokio_stream::iter(messages)).await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(r?.into_inner())
}

/// The YAML of `-f FILE|DIR|-`: (origin, text) per file, a directory's
/// `.yaml`, `.yml` and `.json` files in name order.
pub fn read_sources(path: &str) -> Result<Vec<(String, String)>, Failure> {
    if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Failure::input(format!("reading standard input: {e}")))?;
        return Ok(vec![("(stdin)".into(), text)]);
    }
    let p = Path::new(path);
    let read = |f: &Path| {
        std::fs::read_to_string(f)
            .map(|t| (f.display().to_string(), t))
            .map_err(|e| Failure::input(format!("cannot read {}: {e}", f.display())))
    };
    if !p.is_dir() {
        return Ok(vec![read(p)?]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(p)
        .map_err(|e| Failure::input(format!("cannot read {}: {e}", p.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| {
            f.extension()
                .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Failure::input(format!(
            "{} holds no .yaml, .yml or .json file",
            p.display()
        )));
    }
    files.iter().map(|f| read(f)).collect()
}

/// `wasmesh apply -f FILE|DIR|-`.
pub async fn apply(target: &Target, path: &str) -> Result<(), Failure> {
    let sources = read_sources(path)?;
    let mut c = target.connect().await?;
    let r = c
        .config
        .apply(proto::ApplyRequest {
            sources: sources
                .into_iter()
                .map(|(origin, yaml)| proto::Documents { origin, yaml })
                .collect(),
        })
        .await?
        .into_inner();
    println!("applied revision {}: {}", r.revision, r.services.join(", "));
    Ok(())
}

/// What `get` can show.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Kind {
    /// Applied services.
    Services,
    /// Pushed plugins.
    Plugins,
    /// Connected proxies.
    Proxies,
}

/// `wasmesh get services|plugins|proxies`.
pub async fn get(target: &Target, kind: Kind, format: Format) -> Result<(), Failure> {
    let mut c = target.connect().await?;
    let rows: Vec<serde_json::Value> = match kind {
        Kind::Services => {
            let r = c
                .config
                .list_services(proto::ListServicesRequest {})
                .await?
                .into_inner();
            r.services
                .into_iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.name,
                        "namespace": s.namespace,
                        "revision": s.revision,
                        "spec": serde_yaml_ng::from_str::<serde_json::Value>(&s.spec_yaml).unwrap_or_default(),
                    })
                })
                .collect()
        }
        Kind::Plugins => c
            .registry
            .list_plugins(proto::ListPluginsRequest {})
            .await?
            .into_inner()
            .plugins
            .into_iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name, "version": p.version, "sha256": p.sha256,
                    "size": p.size, "hooks": p.hooks, "used_by": p.used_by,
                })
            })
            .collect(),
        Kind::Proxies => proxies(&mut c).await?.into_iter().map(proxy_json).collect(),
    };
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        ),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(&rows).unwrap_or_default()),
        Format::Table => print_table(kind, &rows),
    }
    Ok(())
}

fn print_table(kind: Kind, rows: &[serde_json::Value]) {
    let cols: &[&str] = match kind {
        Kind::Services => &["name", "namespace", "revision"],
        Kind::Plugins => &["name", "version", "sha256", "size", "used_by"],
        Kind::Proxies => &[
            "service",
            "subset",
            "instance",
            "applied",
            "state",
            "identity",
            "cert_expires_in",
            "reason",
        ],
    };
    let cell = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            table
                .iter()
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!(
        "{}",
        line(cols.iter().map(|c| c.to_ascii_uppercase()).collect())
    );
    for r in table {
        println!("{}", line(r));
    }
}

async fn proxies(c: &mut Clients) -> Result<Vec<proto::ProxyStatus>, Failure> {
    Ok(c.status
        .proxies(proto::ProxiesRequest {})
        .await?
        .into_inner()
        .proxies)
}

/// A proxy's state against its latest version.
fn state(p: &proto::ProxyStatus) -> &'static str {
    if !p.nacked_version.is_empty() && p.nacked_version == p.latest_version {
        "NACK"
    } else if p.applied_version == p.latest_version {
        "ACK"
    } else {
        "pending"
    }
}

fn proxy_json(p: proto::ProxyStatus) -> serde_json::Value {
    serde_json::json!({
        "service": p.service,
        "subset": p.subset,
        "instance": p.instance,
        "app": p.app_address,
        "applied": p.applied_version,
        "latest": p.latest_version,
        "state": state(&p),
        "reason": if p.nack_reason.is_empty() { serde_json::Value::Null } else { p.nack_reason.clone().into() },
        "connected_at_ms": p.connected_at_ms,
        "proxy_version": p.proxy_version,
        "endpoint": p.endpoint,
        "identity": if p.spiffe_id.is_empty() { serde_json::Value::Null } else { p.spiffe_id.clone().into() },
        "cert_expires_at_ms": p.certificate_expires_at_ms,
        "cert_expires_in": if p.certificate_expires_at_ms == 0 {
            serde_json::Value::Null
        } else {
            expires_in(p.certificate_expires_at_ms).into()
        },
    })
}

/// Time left until `at_ms` (ms since the epoch), e.g. `23h59m`, or
/// `expired`.
fn expires_in(at_ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let left = (at_ms - now) / 1000;
    match left {
        ..=0 => "expired".into(),
        1..60 => format!("{left}s"),
        60..3600 => format!("{}m{}s", left / 60, left % 60),
        _ => format!("{}h{}m", left / 3600, left % 3600 / 60),
    }
}

/// `wasmesh token create --service S ...`: the token alone on stdout.
pub async fn token_create(
    target: &Target,
    service: &str,
    namespace: &str,
    ttl: Duration,
    uses: u32,
) -> Result<(), Failure> {
    let mut c = target.connect().await?;
    let r = c
        .identity
        .create_token(proto::CreateTokenRequest {
            service: service.to_string(),
            namespace: namespace.to_string(),
            ttl_ms: ttl.as_millis() as u64,
            uses,
        })
        .await?
        .into_inner();
    println!("{}", r.token);
    eprintln!(
        "join token {} for {}: {} proxy(ies), expires in {}",
        r.id,
        r.spiffe_id,
        r.uses,
        expires_in(r.expires_at_ms)
    );
    Ok(())
}

/// `wasmesh status [--wait [--timeout D]]`.
pub async fn status(target: &Target, wait: bool, timeout: Duration) -> Result<(), Failure> {
    let mut c = target.connect().await?;
    let deadline = Instant::now() + timeout;
    loop {
        let list = proxies(&mut c).await?;
        let nacked: Vec<&proto::ProxyStatus> = list.iter().filter(|p| state(p) == "NACK").collect();
        let pending = list.iter().filter(|p| state(p) == "pending").count();
        if !wait || pending == 0 || !nacked.is_empty() || Instant::now() >= deadline {
            let rows: Vec<serde_json::Value> = list.iter().cloned().map(proxy_json).collect();
            print_table(Kind::Proxies, &rows);
            if !wait {
                return Ok(());
            }
            if let Some(p) = nacked.first() {
                return Err(Failure::runtime(format!(
                    "{} proxy(ies) refused the latest version; {}/{} refused it: {}",
                    nacked.len(),
                    p.service,
                    p.instance,
                    p.nack_reason
                )));
            }
            if pending > 0 {
                return Err(Failure::runtime(format!(
                    "{pending} proxy(ies) had not applied the latest version after {timeout:?}"
                )));
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `delete` removes.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Deletable {
    /// An applied service.
    Service {
        /// Its name.
        name: String,
    },
    /// A pushed plugin version, `NAME@VERSION`.
    Plugin {
        /// `NAME@VERSION`.
        plugin: String,
    },
}

/// `wasmesh delete service NAME | plugin NAME@VERSION`.
pub async fn delete(target: &Target, what: Deletable) -> Result<(), Failure> {
    let mut c = target.connect().await?;
    match what {
        Deletable::Service { name } => {
            let r = c
                .config
                .delete_service(proto::ServiceRef { name: name.clone() })
                .await?
                .into_inner();
            println!("deleted service {name} (revision {})", r.revision);
        }
        Deletable::Plugin { plugin } => {
            let Some((name, version)) = plugin.split_once('@') else {
                return Err(Failure::input(format!(
                    "{plugin:?}: name the plugin as NAME@VERSION"
                )));
            };
            c.registry
                .delete_plugin(proto::PluginRef {
                    name: name.into(),
                    version: version.into(),
                })
                .await?;
            println!("deleted plugin {plugin}");
        }
    }
    Ok(())
}
