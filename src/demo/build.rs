//! The demo's custom plugin, built from source as its author would: the
//! `wasmesh plugin new` scaffold (a greeter counting each client's visits
//! in shared state), given a version header, built with cargo for
//! wasm32-wasip2 — once as 1.0.0, then edited and built again as 1.1.0.
//!
//! It builds in the background from the demo's start. Cargo and its rustc
//! children run in a process group of their own, which the demo ends as a
//! whole when it stops early: no compiler outlives it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The plugin's name, as pushed.
pub const NAME: &str = "greeter";
/// The two versions the demo rolls out.
pub const VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];

/// What the demo changes in the scaffold for each version: the line that
/// ends its response headers gains a version header.
const ANCHOR: &str = ".set_response_header(\"x-visits\", visits.count.to_string()))";

/// A built version.
#[derive(Clone, Debug)]
pub struct Built {
    /// Its version.
    pub version: &'static str,
    /// The component.
    pub bytes: Vec<u8>,
    /// How long cargo took.
    pub took: Duration,
}

/// The cargo process group running now, if any; once the demo stops, no
/// other starts.
#[derive(Clone, Default)]
pub struct Running(Arc<Mutex<Cargo>>);

#[derive(Default)]
struct Cargo {
    group: Option<u32>,
    stopped: bool,
}

impl Running {
    /// End the build in progress, cargo and every compiler it started, and
    /// any build not started yet.
    pub fn kill(&self) {
        let mut cargo = self.0.lock().unwrap();
        cargo.stopped = true;
        if let Some(pgid) = cargo.group.take()
            && let Some(pid) = rustix::process::Pid::from_raw(pgid as i32)
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// The line each version's source changes [`ANCHOR`] into.
pub fn edited_line(version: &str) -> String {
    format!(
        ".set_response_header(\"x-visits\", visits.count.to_string())\n            .set_response_header(\"x-greeter-version\", \"{version}\"))"
    )
}

/// Create the crate in `dir` and build both versions, in turn (blocking;
/// cargo's output goes to `log`).
pub fn build_all(dir: &Path, log: &Path, running: &Running) -> anyhow::Result<Vec<Built>> {
    let krate = crate::plugin_cmd::create_in(dir, NAME)?;
    crate::plugin_cmd::ensure_target()?;
    let lib = krate.join("src/lib.rs");
    let scaffold = std::fs::read_to_string(&lib)?;
    if !scaffold.contains(ANCHOR) {
        bail!("the plugin scaffold changed: the demo finds no {ANCHOR:?} to edit");
    }
    let mut built = Vec::new();
    for version in VERSIONS {
        std::fs::write(&lib, scaffold.replace(ANCHOR, &edited_line(version)))?;
        let start = Instant::now();
        let wasm = cargo(&krate.join("Cargo.toml"), log, running)?;
        built.push(Built {
            version,
            bytes: std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?,
            took: start.elapsed(),
        });
    }
    Ok(built)
}

/// Where the demo's plugin builds go unless `CARGO_TARGET_DIR` says:
/// under the user's cache directory, so a second demo builds in seconds.
fn target_dir() -> Option<PathBuf> {
    if std::env::var_os("CARGO_TARGET_DIR").is_some() {
        return None;
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("wasmesh/demo-build"))
}

fn cargo(manifest: &Path, log: &Path, running: &Running) -> anyhow::Result<PathBuf> {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = crate::plugin_cmd::cargo_command(manifest);
    if let Some(t) = target_dir() {
        cmd.env("CARGO_TARGET_DIR", t);
    }
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let child = {
        // Spawned under the lock: a `kill` either comes before (and no
        // cargo starts) or sees this one.
        let mut cargo = running.0.lock().unwrap();
        if cargo.stopped {
            bail!("the demo stopped");
        }
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("running cargo (is Rust installed? https://rustup.rs)")?;
        cargo.group = Some(child.id());
        child
    };
    let out = child.wait_with_output();
    running.0.lock().unwrap().group.take();
    let out = out.context("waiting for cargo")?;
    if !out.status.success() {
        bail!(
            "cargo build failed ({}):\n{}",
            out.status,
            super::mesh::tail(log, 20)
        );
    }
    crate::plugin_cmd::built_component(&out.stdout, manifest)
}
