//! `wasmesh`: the one binary. `proxy` runs a sidecar (from a mesh file, or
//! from the control plane); `control` runs the control plane; `push`,
//! `apply`, `get`, `delete`, `status` and `top` talk to it; `plugin new` and
//! `plugin build` are the plugin author's tools; `demo` runs the whole mesh
//! on one machine (`demo-app`: one of its apps alone).
//!
//! Exit codes: 0 done; 1 runtime failure (e.g. a port in use, a refusal by
//! control); 2 usage or invalid input (bad file, bad component, a plugin
//! refusing its config).

mod control_cmd;
mod demo;
mod plugin_cmd;
mod sdk_files;
mod top_cmd;
mod validator;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use control_cmd::{Deletable, Format, Kind, Target};
use wasmesh_proxy::runtime::compiler;

#[derive(Parser)]
#[command(
    name = "wasmesh",
    version,
    about = "A service mesh whose policy runs as WebAssembly components"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A sidecar's listeners and limits (each overrides the mesh file's key).
#[derive(Clone, Debug, clap::Args)]
struct ListenerArgs {
    /// Outbound listener (default 127.0.0.1:15001).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listener (default 127.0.0.1:15000).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Inbound listener: peers' requests to this service.
    #[arg(long)]
    inbound: Option<SocketAddr>,
    /// Linear-memory cap of one plugin instance, e.g. 16Mi (overrides
    /// runtime.memory-limit).
    #[arg(long, value_parser = parse_memory)]
    memory_limit: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a sidecar proxy: from a mesh file (--config), or from the
    /// control plane (--control with --service).
    Proxy {
        /// The mesh file (YAML), for a standalone proxy.
        #[arg(
            long,
            short,
            required_unless_present = "control",
            conflicts_with = "control"
        )]
        config: Option<PathBuf>,
        /// Control's gRPC address, e.g. http://127.0.0.1:15010, or several,
        /// comma-separated (control's replicas on one etcd): the proxy moves
        /// to the next when its own goes away.
        #[arg(long, requires = "service")]
        control: Option<String>,
        /// The service this sidecar stands beside (with --control).
        #[arg(long)]
        service: Option<String>,
        /// Its subset (version) (with --control).
        #[arg(long, default_value = "v1")]
        subset: String,
        /// Its app's address, registered with control as an endpoint of the
        /// service, and where the inbound listener sends.
        #[arg(long)]
        app: Option<SocketAddr>,
        /// Its instance id (default: HOSTNAME-PID).
        #[arg(long)]
        instance: Option<String>,
        /// A join token (`wasmesh token create`), in this file: the proxy
        /// gets a mesh identity and serves mesh mTLS (with --control
        /// https://…). Or set WASMESH_TOKEN; never on the command line.
        #[arg(long, value_name = "FILE", requires = "control")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        listeners: ListenerArgs,
        /// Reload when the file or a component it references changes.
        #[arg(long)]
        watch: bool,
        /// Worker threads (default: the number of cores).
        #[arg(long)]
        workers: Option<usize>,
        /// How long in-flight requests may take to finish on SIGTERM.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        drain: Duration,
        /// Keep compiled plugins (and, with --control, the last snapshot
        /// applied and its components) in this directory (yours alone, mode
        /// 700), so a restart does not compile them again.
        #[arg(long, value_name = "DIR")]
        compile_cache: Option<PathBuf>,
        /// Export trace spans over OTLP/gRPC to this collector, e.g.
        /// http://127.0.0.1:4317 (W3C and B3 trace headers are carried
        /// upstream either way).
        #[arg(long, value_name = "URL")]
        otlp_endpoint: Option<String>,
        /// The share of new traces sampled, 0 to 1 (a request that arrives
        /// with a sampling decision keeps it).
        #[arg(long, default_value_t = 0.01, value_name = "RATIO")]
        trace_sampling: f64,
        /// Write a JSON line per request to this file (appended), or `-`
        /// for stdout.
        #[arg(long, value_name = "FILE")]
        access_log: Option<String>,
    },
    /// Run the control plane: plugin registry, config and discovery.
    Control {
        /// gRPC listener (loopback unless --insecure).
        #[arg(long, default_value = wasmesh_control::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Admin HTTP listener (/metrics, /ready).
        #[arg(long, default_value = wasmesh_control::DEFAULT_ADMIN)]
        admin: SocketAddr,
        /// Where control keeps its state (the embedded store; the admin
        /// token and compiled plugins by default).
        #[arg(long, value_name = "DIR", required_unless_present = "store")]
        data_dir: Option<PathBuf>,
        /// Keep the state in etcd instead, so that several replicas share it:
        /// etcd://HOST:PORT[,HOST:PORT…][/PREFIX] (default prefix /wasmesh).
        /// Needs --admin-token-file and --store-key-file (the same files on
        /// every replica) and a build with `--features etcd`.
        #[arg(long, value_name = "URL", requires_all = ["admin_token_file", "store_key_file"])]
        store: Option<String>,
        /// With --store etcd://…: the key sealing the CA's private key in
        /// etcd (created when missing).
        #[arg(long, value_name = "FILE", requires = "store")]
        store_key_file: Option<PathBuf>,
        /// etcd's CA (PEM): reach its members over TLS.
        #[arg(long, value_name = "FILE", requires = "store")]
        etcd_ca: Option<PathBuf>,
        /// A client certificate for etcd (PEM), with --etcd-key.
        #[arg(long, value_name = "FILE", requires_all = ["store", "etcd_key"])]
        etcd_cert: Option<PathBuf>,
        /// The key of --etcd-cert (PEM).
        #[arg(long, value_name = "FILE", requires = "etcd_cert")]
        etcd_key: Option<PathBuf>,
        /// An etcd user (authentication on), with --etcd-password-file.
        #[arg(long, value_name = "NAME", requires_all = ["store", "etcd_password_file"])]
        etcd_user: Option<String>,
        /// The file holding --etcd-user's password.
        #[arg(long, value_name = "FILE", requires = "etcd_user")]
        etcd_password_file: Option<PathBuf>,
        /// The admin token file (default DATA_DIR/admin.token; created at
        /// first start).
        #[arg(long, value_name = "FILE")]
        admin_token_file: Option<PathBuf>,
        /// Allow listening beyond loopback without TLS.
        #[arg(long)]
        insecure: bool,
        /// How long a disconnected proxy keeps its endpoints.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        endpoint_grace: Duration,
        /// TLS listener: proxies with identities (join tokens) reach control
        /// here.
        #[arg(long, default_value = wasmesh_control::DEFAULT_LISTEN_TLS)]
        listen_tls: SocketAddr,
        /// The mesh's SPIFFE trust domain.
        #[arg(long, default_value = wasmesh_api::spiffe::DEFAULT_TRUST_DOMAIN, value_parser = parse_trust_domain)]
        trust_domain: wasmesh_api::TrustDomain,
        /// Use this CA certificate (an intermediate under your root, PEM)
        /// instead of generating one; with --ca-key and --ca-root.
        #[arg(long, value_name = "FILE", requires_all = ["ca_key", "ca_root"])]
        ca_cert: Option<PathBuf>,
        /// The private key of --ca-cert (PEM).
        #[arg(long, value_name = "FILE", requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// The root --ca-cert chains to (PEM): what proxies trust.
        #[arg(long, value_name = "FILE", requires = "ca_cert")]
        ca_root: Option<PathBuf>,
        /// Lifetime of the certificates proxies get (renewed at 50–70% of
        /// it).
        #[arg(long, default_value = "24h", value_parser = parse_cert_ttl)]
        cert_ttl: Duration,
        /// Another name proxies reach the TLS listener at (a DNS name or an
        /// IP), added to control's certificate beside localhost and
        /// 127.0.0.1; repeatable. In Kubernetes: the Service's names.
        #[arg(long = "tls-san", value_name = "NAME|IP")]
        tls_san: Vec<String>,
    },
    /// Join tokens: how a new proxy proves the service it stands beside.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Push a plugin component to control as NAME@VERSION.
    Push {
        /// The component (.wasm).
        file: PathBuf,
        /// The plugin's name.
        #[arg(long)]
        name: String,
        /// Its version (immutable once pushed).
        #[arg(long)]
        version: String,
        #[command(flatten)]
        target: Target,
    },
    /// Apply config documents (services) to control: all or none.
    Apply {
        /// A YAML file, a directory of them, or - for standard input.
        #[arg(short = 'f', long = "file")]
        file: String,
        #[command(flatten)]
        target: Target,
    },
    /// Show services, plugins or proxies.
    Get {
        /// What to show.
        kind: Kind,
        /// Output format.
        #[arg(short, long, default_value = "table")]
        output: Format,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a service or a plugin version.
    Delete {
        #[command(subcommand)]
        what: Deletable,
        #[command(flatten)]
        target: Target,
    },
    /// Every connected proxy: applied version, last ACK or NACK.
    Status {
        /// Wait until every connected proxy has ACKed the latest version
        /// (exit 0) or one has NACKed it (exit 1).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        target: Target,
    },
    /// Service edges, live: who calls whom, requests a second, errors,
    /// p50/p99 and the split by subset, from the proxies' reports to
    /// control.
    Top {
        /// A table refreshed in place, or one snapshot as JSON.
        #[arg(short, long, default_value = "table")]
        output: top_cmd::TopFormat,
        /// The window rates and percentiles are taken over (at most 60s).
        #[arg(long, default_value = "10s", value_parser = parse_window)]
        window: Duration,
        /// How often the table refreshes.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        interval: Duration,
        /// Print the table once and exit.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The whole mesh on this machine in one command: control, bookinfo's
    /// apps with a sidecar each (mutual TLS), traffic, and scripted steps
    /// (canary, rollback, fault injection, retries and a circuit breaker,
    /// authorization, a custom plugin swapped live), each measured.
    Demo(demo::DemoArgs),
    /// One of the demo's apps alone (productpage, details, reviews-v1…v3,
    /// ratings) or its traffic generator (loadgen), beside a sidecar: the
    /// demo on Kubernetes (deploy/kubernetes/demo).
    DemoApp(demo::AppArgs),
    /// Write and build plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token for a service's proxies; prints the token alone
    /// on stdout (give it to the proxies as --token-file or WASMESH_TOKEN).
    Create {
        /// The service its proxies stand beside.
        #[arg(long)]
        service: String,
        /// The service's namespace.
        #[arg(long, default_value = wasmesh_api::resources::DEFAULT_NAMESPACE)]
        namespace: String,
        /// How long it can be used.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many proxies (replicas) may use it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Create `./NAME`, a plugin crate with a test, ready for `cargo test`
    /// and `wasmesh plugin build`.
    New {
        /// The plugin's name (also its directory).
        name: String,
    },
    /// Build a plugin crate into a component; prints `PATH SHA256`.
    Build {
        /// The crate's directory (default: the current one).
        dir: Option<PathBuf>,
        /// Write the component here.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Push it to control as NAME@VERSION.
        #[arg(long, value_name = "NAME@VERSION")]
        push: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Write a stock plugin shipped in this binary (`builtin:NAME`) to a file;
    /// prints `PATH SHA256`.
    Export {
        /// The builtin's name, e.g. `router`.
        name: String,
        /// Where to write it.
        #[arg(long, short)]
        output: PathBuf,
    },
}

/// This executable, to run the compiler process from. On Linux it is held
/// open from the start and run as `/proc/self/fd/N`: that names the file this
/// process was started from even after an upgrade renamed a new binary over
/// it, so proxy and compiler always match (`/proc/self/exe` would too, but
/// under valgrind it names valgrind).
fn own_executable() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    #[cfg(target_os = "linux")]
    if let Ok(file) = std::fs::File::open(&exe) {
        use std::os::fd::IntoRawFd;
        // Kept open for the life of the process.
        let fd = file.into_raw_fd();
        return Some(PathBuf::from(format!("/proc/self/fd/{fd}")));
    }
    Some(exe)
}

/// Where components are compiled: in a child process running this
/// executable — except under valgrind (benches/compare/instructions), where
/// the CPU this process sees is valgrind's, which lacks some of the host's
/// features (AVX-VNNI, say): a native child would compile code this process
/// refuses to load, so it compiles for itself.
fn compiler() -> compiler::Compiler {
    let under_valgrind =
        std::env::var_os("LD_PRELOAD").is_some_and(|p| p.to_string_lossy().contains("vgpreload"));
    if under_valgrind {
        return compiler::Compiler::InProcess;
    }
    own_executable().map_or(
        compiler::Compiler::InProcess,
        compiler::Compiler::Subprocess,
    )
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    wasmesh_api::parse_duration(s)
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(60) {
        return Err(format!("{s:?}: give a window from 1s to 60s"));
    }
    Ok(d)
}

fn parse_trust_domain(s: &str) -> Result<wasmesh_api::TrustDomain, String> {
    s.parse()
        .map_err(|e: wasmesh_api::spiffe::IdError| e.to_string())
}

fn parse_cert_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(5) {
        return Err(format!(
            "{s:?} is too short for a certificate's life: at least 5s"
        ));
    }
    Ok(d)
}

fn parse_memory(s: &str) -> Result<usize, String> {
    wasmesh_api::MemoryLimit::parse(s).map(|m| m.get() as usize)
}

/// The system allocator, keeping a few freed blocks of 1–8 KiB (hyper's
/// read buffers, header maps) for the next request.
#[global_allocator]
static ALLOCATOR: wasmesh_proxy::runtime::memory::Allocator =
    wasmesh_proxy::runtime::memory::Allocator;

fn main() -> ExitCode {
    // The proxy compiles components in a child process running this same
    // executable (see host-proxy/src/runtime/compiler.rs).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == compiler::SUBCOMMAND)
    {
        return compiler::child_main();
    }
    let cli = Cli::parse();
    #[cfg(feature = "native-chain")]
    {
        use wasmesh_plugin_sdk::native::filter;
        wasmesh_proxy::runtime::native::register(vec![
            ("router", filter::<router::Router>),
            ("retry", filter::<retry::Retry>),
            ("circuit-breaker", filter::<circuit_breaker::CircuitBreaker>),
            ("fault-injection", filter::<fault_injection::FaultInjection>),
            ("authz", filter::<authz::Authz>),
        ]);
    }
    // The demo writes its own log (control's) to a file of its directory.
    if !matches!(cli.command, Command::Demo(_)) {
        tracing_subscriber::fmt()
            .with_env_filter(log_filter())
            .with_writer(std::io::stderr)
            // Colours for a person at a terminal; plain text for log files.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match cli.command {
        Command::Proxy {
            config,
            control,
            service,
            subset,
            app,
            instance,
            token_file,
            listeners,
            watch,
            workers,
            drain,
            compile_cache,
            otlp_endpoint,
            trace_sampling,
            access_log,
        } => {
            demo::exit_with_parent();
            let trace = otlp_endpoint.map(|endpoint| wasmesh_proxy::trace::TraceOptions {
                endpoint,
                sampling: trace_sampling,
                service: service.clone().unwrap_or_else(|| "wasmesh".to_string()),
            });
            let token = match token_file {
                Some(f) => match std::fs::read_to_string(&f) {
                    Ok(t) => Some(t.trim().to_string()),
                    Err(e) => {
                        eprintln!("error: cannot read the join token {}: {e}", f.display());
                        return ExitCode::from(2);
                    }
                },
                None => std::env::var("WASMESH_TOKEN")
                    .ok()
                    .filter(|t| !t.trim().is_empty()),
            };
            // What is this proxy's own (its certificate, its last snapshot)
            // lives in a directory of its service and subset within the
            // compile cache: a node's sidecars can share one cache (and
            // compile each plugin once) without reading each other's.
            let own_state = compile_cache.as_ref().zip(service.as_ref()).map(|(c, s)| {
                let safe = |n: &str| {
                    n.replace(
                        |ch: char| !(ch.is_ascii_alphanumeric() || "._-".contains(ch)),
                        "_",
                    )
                };
                c.join("proxies")
                    .join(format!("{}.{}", safe(s), safe(&subset)))
            });
            let identity = control
                .as_ref()
                .filter(|url| token.is_some() || url.starts_with("https://"))
                .map(|_| wasmesh_proxy::identity::IdentityOptions {
                    token,
                    cache: own_state.clone(),
                });
            let control = control.map(|url| wasmesh_proxy::xds::ControlOptions {
                url,
                service: service.unwrap_or_default(),
                subset,
                instance: instance.unwrap_or_else(default_instance),
                app,
                inbound: None,
                cache: own_state,
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(5),
                proxy_version: env!("CARGO_PKG_VERSION").to_string(),
            });
            let options = wasmesh_proxy::Options {
                config,
                control,
                identity,
                overrides: wasmesh_proxy::config::Overrides {
                    admin: listeners.admin,
                    listen: listeners.listen,
                    inbound: listeners.inbound,
                    memory_limit: listeners.memory_limit,
                },
                watch,
                workers: 0,
                worker: None,
                builtins: wasmesh_artifacts::BUILTINS,
                compile_cache,
                compiler: compiler(),
                trace,
                access_log,
            };
            proxy(options, workers, drain)
        }
        Command::Control {
            listen,
            admin,
            data_dir,
            store,
            store_key_file,
            etcd_ca,
            etcd_cert,
            etcd_key,
            etcd_user,
            etcd_password_file,
            admin_token_file,
            insecure,
            endpoint_grace,
            listen_tls,
            trust_domain,
            ca_cert,
            ca_key,
            ca_root,
            cert_ttl,
            tls_san,
        } => control(wasmesh_control::Options {
            listen,
            admin,
            data_dir,
            store,
            store_key_file,
            etcd: wasmesh_control::EtcdAccess {
                ca: etcd_ca,
                cert: etcd_cert,
                key: etcd_key,
                user: etcd_user,
                password_file: etcd_password_file,
            },
            admin_token_file,
            insecure,
            endpoint_grace,
            listen_tls,
            identity: wasmesh_control::identity::IdentityOptions {
                trust_domain,
                ca_files: match (ca_cert, ca_key, ca_root) {
                    (Some(cert), Some(key), Some(root)) => {
                        Some(wasmesh_control::identity::CaFiles { cert, key, root })
                    }
                    _ => None,
                },
                cert_ttl,
                server_names: std::iter::once("localhost".to_string())
                    .chain(
                        tls_san
                            .iter()
                            .filter(|s| s.parse::<std::net::IpAddr>().is_err())
                            .cloned(),
                    )
                    .collect(),
                server_ips: std::iter::once(std::net::Ipv4Addr::LOCALHOST.into())
                    .chain(tls_san.iter().filter_map(|s| s.parse().ok()))
                    .collect(),
            },
        }),
        Command::Token {
            command:
                TokenCommand::Create {
                    service,
                    namespace,
                    ttl,
                    uses,
                    target,
                },
        } => client(async move {
            control_cmd::token_create(&target, &service, &namespace, ttl, uses).await
        }),
        Command::Push {
            file,
            name,
            version,
            target,
        } => client(async move { control_cmd::push(&target, &file, &name, &version).await }),
        Command::Apply { file, target } => {
            client(async move { control_cmd::apply(&target, &file).await })
        }
        Command::Get {
            kind,
            output,
            target,
        } => client(async move { control_cmd::get(&target, kind, output).await }),
        Command::Delete { what, target } => {
            client(async move { control_cmd::delete(&target, what).await })
        }
        Command::Status {
            wait,
            timeout,
            target,
        } => client(async move { control_cmd::status(&target, wait, timeout).await }),
        Command::Top {
            output,
            window,
            interval,
            once,
            target,
        } => client(async move { top_cmd::top(&target, output, window, interval, once).await }),
        Command::Demo(args) => demo::run(args),
        Command::DemoApp(args) => demo::app(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "wasmesh",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Plugin { command } => match command {
            PluginCommand::New { name } => plugin_cmd::new(&name),
            PluginCommand::Build {
                dir,
                output,
                push: None,
                ..
            } => plugin_cmd::build(dir.as_deref(), output.as_deref()),
            PluginCommand::Build {
                dir,
                output,
                push: Some(push),
                target,
            } => build_and_push(dir, output, &push, target),
            PluginCommand::Export { name, output } => plugin_cmd::export(&name, &output),
        },
    }
}

/// `RUST_LOG`, else `info`.
fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "proxy".into());
    format!("{host}-{}", std::process::id())
}

/// A small runtime for a client command.
fn client(fut: impl std::future::Future<Output = Result<(), control_cmd::Failure>>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => control_cmd::finish(rt.block_on(fut)),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

fn build_and_push(
    dir: Option<PathBuf>,
    output: Option<PathBuf>,
    push: &str,
    target: Target,
) -> ExitCode {
    let Some((name, version)) = push.split_once('@') else {
        eprintln!("error: --push {push:?}: name it NAME@VERSION");
        return ExitCode::from(2);
    };
    let (_, bytes) = match plugin_cmd::build_component(dir.as_deref()) {
        Ok(b) => b,
        Err((code, e)) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(code);
        }
    };
    if let Some(o) = &output
        && let Err(e) = std::fs::write(o, &bytes)
    {
        eprintln!("error: cannot write {}: {e}", o.display());
        return ExitCode::from(1);
    }
    let (name, version) = (name.to_string(), version.to_string());
    client(async move {
        let mut c = target.connect().await?;
        let p = control_cmd::push_bytes(&mut c, bytes, &name, &version).await?;
        println!("{}@{} {}", p.name, p.version, p.sha256);
        Ok(())
    })
}

/// A multi-threaded tokio runtime, or the exit code once it said why not.
fn multi_thread_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}

fn control(options: wasmesh_control::Options) -> ExitCode {
    let rt = match multi_thread_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let cache = options.data_dir.as_ref().map(|d| d.join("compile-cache"));
        let validator = match validator::RuntimeValidator::new(
            compiler(),
            wasmesh_artifacts::BUILTINS,
            cache.as_deref(),
        ) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(1);
            }
        };
        let control = match wasmesh_control::Control::start(options, validator).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(1);
            }
        };
        match control.run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        }
    })
}

fn proxy(mut options: wasmesh_proxy::Options, workers: Option<usize>, drain: Duration) -> ExitCode {
    let workers = workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    options.workers = workers;
    wasmesh_proxy::runtime::memory::limit_arenas(workers + 1);
    // Requests run on the worker runtime, built with the I/O driver only: a
    // runtime with timers reads the clock and scans its timer wheel on
    // every wake-up (≈ 1 k instructions a request at a light load,
    // benches/RESULTS.md). One worker: tokio's current-thread scheduler.
    // Its thread polls the sockets and runs the tasks itself; the
    // multi-threaded scheduler with one worker also hands work between that
    // worker and the thread blocked in `block_on`, and that cost ≈ 10 µs of
    // CPU per request here (benches/compare: 27k → 37k requests/s on one
    // core, same CPU).
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    // Everything else runs on this thread's runtime: starting up, builds
    // and compiles (on its blocking pool), the control-plane client,
    // identity renewal, the admin server, reloads, and every timer
    // (wasmesh_proxy::timer makes the workers' timers here).
    let runtimes = builder
        .enable_io()
        .thread_name("wasmesh-worker")
        .build()
        .and_then(|worker| {
            let control = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok((worker, control))
        });
    let (worker, rt) = match runtimes {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    wasmesh_proxy::timer::install(rt.handle().clone());
    options.worker = Some(worker.handle().clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // A current-thread runtime runs its tasks only while a thread is blocked
    // on it; a multi-threaded one on its own threads (this one holds it).
    let serving = std::thread::Builder::new()
        .name("wasmesh-worker".into())
        .spawn(move || worker.block_on(async { drop(stopped.await) }));
    let serving = match serving {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot start the worker thread: {e}");
            return ExitCode::from(1);
        }
    };
    let code = run_proxy(&rt, options, drain);
    drop(stop);
    let _ = serving.join();
    code
}

fn run_proxy(
    rt: &tokio::runtime::Runtime,
    options: wasmesh_proxy::Options,
    drain: Duration,
) -> ExitCode {
    rt.block_on(async move {
        let proxy = match wasmesh_proxy::Proxy::start(options).await {
            Ok(p) => p,
            Err(wasmesh_proxy::StartError::Config(e)) => {
                eprintln!("error: invalid configuration: {e}");
                return ExitCode::from(2);
            }
            Err(wasmesh_proxy::StartError::Runtime(e)) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(1);
            }
        };
        match proxy.run(drain).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        }
    })
}
