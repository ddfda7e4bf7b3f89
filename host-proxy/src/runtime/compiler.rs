//! Where components are compiled: in this process, or in a child process
//! running this same executable (`wasmesh __compile-component`).
//!
//! The proxy binary compiles out of process. Cranelift allocates tens of MiB
//! per component and touches megabytes of compiler code; in process, glibc
//! keeps much of that heap and the page cache keeps that code resident for
//! the sidecar's whole life (a 5-plugin chain left the proxy ≈ 85 MB
//! resident instead of ≈ 25 MB). A child also contains whatever a hostile
//! component does to the compiler (memory, time, a crash): the child is
//! killed at the compile deadline, and the proxy never runs the compiler's
//! code at all. Libraries, tests and benchmarks compile in process.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use wasmtime::Engine;

use super::LoadError;

/// The hidden subcommand the proxy binary must route to [`child_main`].
pub const SUBCOMMAND: &str = "__compile-component";

/// How components are compiled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Compiler {
    /// On a thread of this process.
    #[default]
    InProcess,
    /// In a child process: `exe __compile-component`, which must call
    /// [`child_main`].
    Subprocess(PathBuf),
}

/// The child's side: read a component from stdin, write the engine's
/// precompiled artifact to stdout. Errors go to stderr, exit code 1. An
/// argument after the subcommand names the directory of the compiled
/// functions cache (see [`FunctionCache`]).
pub fn child_main() -> ExitCode {
    let functions = std::env::args_os().nth(2).map(PathBuf::from);
    let run = || -> Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        std::io::stdin()
            .take(super::MAX_COMPONENT_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read the component: {e}"))?;
        let mut config = super::engine_config();
        if let Some(dir) = functions {
            FunctionCache::enable(&mut config, dir).map_err(|e| format!("{e:#}"))?;
        }
        let engine = Engine::new(&config).map_err(|e| format!("{e:#}"))?;
        engine
            .precompile_component(&bytes)
            .map_err(|e| format!("{e:#}"))
    };
    match run() {
        Ok(artifact) => match std::io::stdout().lock().write_all(&artifact) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cannot write the compiled component: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Compile `bytes` in a child process running `exe`, killing it past
/// `timeout`; the artifact it produced.
pub(super) fn compile_in_child(
    exe: &std::path::Path,
    bytes: &[u8],
    timeout: Duration,
    functions: Option<&std::path::Path>,
) -> Result<Vec<u8>, LoadError> {
    let spawn_err =
        |e: std::io::Error| LoadError::Compiler(format!("cannot run {}: {e}", exe.display()));
    let mut child = Command::new(exe)
        .arg(SUBCOMMAND)
        .args(functions)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .spawn()
        .map_err(spawn_err)?;
    let (mut stdin, mut stdout, mut stderr) = (
        child.stdin.take().expect("piped"),
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    let input = bytes.to_vec();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let io = std::thread::Builder::new()
        .name("wasmesh-compile".into())
        .spawn(move || {
            // Write and read on their own threads: the child may block on a
            // full stdout before it has read all of stdin.
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            });
            let err = std::thread::spawn(move || {
                let mut e = String::new();
                let _ = stderr.read_to_string(&mut e);
                e
            });
            let mut out = Vec::new();
            let read = stdout.read_to_end(&mut out);
            let _ = writer.join();
            let err = err.join().unwrap_or_default();
            let _ = tx.send((read.map(|_| out), err));
        })
        .map_err(spawn_err)?;
    let result = rx.recv_timeout(timeout);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait();
    let _ = io.join();
    let (out, err) = result.map_err(|_| LoadError::CompileTimeout(timeout))?;
    let status = status.map_err(spawn_err)?;
    if !status.success() {
        // The child explains a component it refuses on stderr (exit 1);
        // a crash or a kill says nothing about the component.
        let why = err.trim();
        return Err(match status.code() {
            Some(1) if !why.is_empty() => LoadError::Invalid(why.to_string()),
            _ => LoadError::Compiler(format!("{status}: {why}")),
        });
    }
    out.map_err(spawn_err)
}

/// Compiled functions kept on disk, by a digest of everything that went into
/// compiling each one (wasmtime's incremental compilation cache): a new
/// build of a plugin recompiles only the functions that changed, and a
/// rebuild that changed none (or a component seen before) compiles in a
/// fraction of the time. It lives in the compile cache (the proxy's own
/// directory, as trusted as the artifacts beside it).
#[derive(Debug)]
pub struct FunctionCache {
    dir: PathBuf,
}

impl FunctionCache {
    /// Compile with the functions cached in `dir` (created).
    pub fn enable(config: &mut wasmtime::Config, dir: PathBuf) -> anyhow::Result<()> {
        std::fs::create_dir_all(&dir)?;
        config
            .enable_incremental_compilation(std::sync::Arc::new(Self { dir }))
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        Ok(())
    }

    fn path(&self, key: &[u8]) -> PathBuf {
        use sha2::Digest;
        self.dir.join(hex::encode(sha2::Sha256::digest(key)))
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
        std::fs::read(self.path(key))
            .ok()
            .map(std::borrow::Cow::Owned)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let path = self.path(key);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &value)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .is_ok()
    }
}
