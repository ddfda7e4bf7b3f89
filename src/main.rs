//! `wasmesh`: the one binary. `proxy` runs a sidecar from a mesh file;
//! `plugin new` and `plugin build` are the plugin author's tools.
//!
//! Exit codes: 0 done; 1 runtime failure (e.g. a port in use); 2 usage or
//! invalid input (bad file, bad component, a plugin refusing its config).

mod plugin_cmd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
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

#[derive(Subcommand)]
enum Command {
    /// Run a sidecar proxy from a mesh file (standalone mode).
    Proxy {
        /// The mesh file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Reload when the file or a component it references changes.
        #[arg(long)]
        watch: bool,
        /// Worker threads (default: the number of cores).
        #[arg(long)]
        workers: Option<usize>,
        /// How long in-flight requests may take to finish on SIGTERM.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        drain: Duration,
        /// Keep compiled plugins in this directory (yours alone, mode 700)
        /// so a restart does not compile them again.
        #[arg(long, value_name = "DIR")]
        compile_cache: Option<PathBuf>,
    },
    /// Write and build plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
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

fn parse_duration(s: &str) -> Result<Duration, String> {
    wasmesh_api::parse_duration(s)
}

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Proxy {
            config,
            watch,
            workers,
            drain,
            compile_cache,
        } => proxy(config, watch, workers, drain, compile_cache),
        Command::Plugin { command } => match command {
            PluginCommand::New { name } => plugin_cmd::new(&name),
            PluginCommand::Build { dir } => plugin_cmd::build(dir.as_deref()),
            PluginCommand::Export { name, output } => plugin_cmd::export(&name, &output),
        },
    }
}

fn proxy(
    config: PathBuf,
    watch: bool,
    workers: Option<usize>,
    drain: Duration,
    compile_cache: Option<PathBuf>,
) -> ExitCode {
    let workers = workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    // One worker: tokio's current-thread scheduler. Its thread polls the
    // sockets and runs the tasks itself; the multi-threaded scheduler with
    // one worker also hands work between that worker and the thread blocked
    // in `block_on`, and that cost ≈ 10 µs of CPU per request here
    // (benches/compare: 27k → 37k requests/s on one core, same CPU).
    // Builds and compiles run on the blocking pool either way.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let options = wasmesh_proxy::Options {
        config,
        watch,
        workers,
        builtins: wasmesh_artifacts::BUILTINS,
        compile_cache,
        compiler: own_executable().map_or(compiler::Compiler::InProcess, |exe| {
            compiler::Compiler::Subprocess(exe)
        }),
    };
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
