//! `wasmesh plugin new` and `wasmesh plugin build`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, bail};

const TARGET: &str = "wasm32-wasip2";

fn fail(code: u8, e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::from(code)
}

/// `wasmesh plugin new NAME`.
pub fn new(name: &str) -> ExitCode {
    match create_in(Path::new("."), name) {
        Ok(dir) => {
            eprintln!(
                "created {}: `cd {name} && cargo test` runs its tests, `wasmesh plugin build` builds it",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(2, e),
    }
}

/// Create the plugin crate `NAME` in `parent`: its directory.
pub fn create_in(parent: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        bail!(
            "{name:?} is not a plugin name: use lowercase letters, digits, '-' and '_', starting with a letter"
        );
    }
    let dir = parent.join(name);
    if dir.exists() {
        bail!(
            "{} already exists; choose another name or remove it",
            dir.display()
        );
    }
    // The SDK this binary carries, written under the user's data
    // directory (once per SDK version).
    let sdk = crate::sdk_files::install()?;
    let sdk_dir = sdk.display().to_string().replace('\\', "/");
    let ident: String = name
        .split(['-', '_'])
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    std::fs::create_dir_all(dir.join("src")).context("creating the plugin directory")?;
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
wasmesh-plugin-sdk = {{ path = "{sdk_dir}" }}
serde = {{ version = "1", features = ["derive"] }}

# Small components: `wasmesh plugin build` builds in release.
[profile.release]
opt-level = "s"
lto = true
strip = true
codegen-units = 1

# A standalone crate, not part of any enclosing workspace.
[workspace]
"#
        ),
    )?;
    std::fs::write(dir.join(".gitignore"), "/target\n")?;
    std::fs::write(
        dir.join("src/lib.rs"),
        format!(
            r##"//! {name}: a wasmesh plugin. It counts each client's requests in the
//! proxy's shared state — every worker and every new version of the plugin
//! see the same counts — and answers with the count (`x-visits`) and a
//! greeting (`x-hello`). Change it to decide what your mesh needs.

use serde::{{Deserialize, Serialize}};
use wasmesh_plugin_sdk::host::state;
use wasmesh_plugin_sdk::{{Plugin, Request, RequestDecision, WriteOptions, export}};

/// The configuration an operator gives in the mesh file (`config:`).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {{
    /// The value of the `x-hello` response header.
    pub greeting: String,
    /// How long a client's count is kept after its last request.
    pub forget_after_seconds: u64,
}}

impl Default for Config {{
    fn default() -> Self {{
        Self {{
            greeting: "hello from {name}".into(),
            forget_after_seconds: 60,
        }}
    }}
}}

/// What is kept per client in shared state (as JSON).
#[derive(Debug, Serialize, Deserialize)]
pub struct {ident}State {{
    /// Requests seen.
    pub count: u64,
}}

/// The plugin.
pub struct {ident} {{
    greeting: String,
    /// Each count expires this long after its last write: clients that
    /// come and go never fill the scope's 10,000 keys.
    keep: WriteOptions,
}}

impl Plugin for {ident} {{
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {{
        if config.greeting.is_empty() {{
            return Err("config.greeting: must not be empty".into());
        }}
        if config.forget_after_seconds == 0 {{
            return Err("config.forgetAfterSeconds: must be at least 1".into());
        }}
        Ok(Self {{
            greeting: config.greeting,
            keep: WriteOptions::ttl_ms(config.forget_after_seconds * 1000).evicting(),
        }})
    }}

    fn on_request(&self, req: &Request<'_>) -> Result<RequestDecision, String> {{
        let client = req.source().ip().map_or_else(|| "unknown".into(), |ip| ip.to_string());
        // Read the count, add one, write it back unless another instance
        // wrote in between (then read again): no visit is lost.
        let (visits, ()) = state::update(&format!("visits:{{client}}"), self.keep, |old: Option<{ident}State>| {{
            ({ident}State {{ count: old.map_or(0, |v| v.count) + 1 }}, ())
        }})
        .map_err(|e| e.to_string())?;
        Ok(RequestDecision::proceed()
            .set_response_header("x-hello", self.greeting.as_str())
            .set_response_header("x-visits", visits.count.to_string()))
    }}
}}

export!({ident}, hooks: [on_request]);

#[cfg(test)]
mod tests {{
    use super::*;
    use wasmesh_plugin_sdk::HeaderOp;
    use wasmesh_plugin_sdk::testing::{{Harness, TestRequest}};

    fn header(d: &RequestDecision, name: &str) -> String {{
        d.response_headers
            .iter()
            .find_map(|op| match op {{
                HeaderOp::Set(h) if h.name == name => Some(h.value.clone()),
                _ => None,
            }})
            .unwrap_or_default()
    }}

    #[test]
    fn greets_and_counts_each_clients_visits() {{
        let h = Harness::<{ident}>::new(r#"{{"greeting":"hi"}}"#).unwrap();
        let d = h.on_request(&TestRequest::get("/")).unwrap();
        assert_eq!(header(&d, "x-hello"), "hi");
        assert_eq!(header(&d, "x-visits"), "1");
        let d = h.on_request(&TestRequest::get("/")).unwrap();
        assert_eq!(header(&d, "x-visits"), "2");
    }}

    #[test]
    fn forgets_a_client_after_a_while() {{
        let h = Harness::<{ident}>::new(r#"{{"forgetAfterSeconds":10}}"#).unwrap();
        h.on_request(&TestRequest::get("/")).unwrap();
        h.advance(10_000);
        let d = h.on_request(&TestRequest::get("/")).unwrap();
        assert_eq!(header(&d, "x-visits"), "1");
    }}

    #[test]
    fn loses_no_visit_when_another_instance_writes_in_between() {{
        let h = Harness::<{ident}>::new("null").unwrap();
        h.on_request(&TestRequest::get("/")).unwrap();
        // Another worker counts 9 more visits between this request's read
        // and its write: the write loses, reads again, counts the 11th.
        h.before_next_write(|other| {{
            other.set("visits:127.0.0.1", br#"{{"count":10}}"#).unwrap();
        }});
        let d = h.on_request(&TestRequest::get("/")).unwrap();
        assert_eq!(header(&d, "x-visits"), "11");
    }}

    #[test]
    fn refuses_an_empty_greeting() {{
        let e = Harness::<{ident}>::new(r#"{{"greeting":""}}"#).err().unwrap();
        assert!(e.contains("config.greeting"), "{{e}}");
    }}
}}
"##
        ),
    )?;
    Ok(dir)
}

/// Build the plugin crate in `dir` into a checked component: its path and
/// bytes, or the exit code and why not.
pub fn build_component(dir: Option<&Path>) -> Result<(PathBuf, Vec<u8>), (u8, anyhow::Error)> {
    let dir = dir.unwrap_or(Path::new("."));
    let manifest = dir.join("Cargo.toml");
    if !manifest.exists() {
        return Err((
            2,
            anyhow::anyhow!(
                "no Cargo.toml in {}: give the plugin crate's directory",
                dir.display()
            ),
        ));
    }
    ensure_target().map_err(|e| (1, e))?;
    let wasm = cargo_build(&manifest).map_err(|e| (2, e))?;
    let bytes = std::fs::read(&wasm)
        .map_err(|e| (1, anyhow::anyhow!("cannot read {}: {e}", wasm.display())))?;
    let runtime = wasmesh_proxy::runtime::Runtime::new().map_err(|e| (1, e))?;
    if let Err(e) = runtime.load(&bytes) {
        return Err((
            2,
            anyhow::anyhow!("{} was built but is refused: {e}", wasm.display()),
        ));
    }
    Ok((wasm, bytes))
}

/// `wasmesh plugin build [DIR] [-o FILE]`: prints `PATH SHA256`.
pub fn build(dir: Option<&Path>, output: Option<&Path>) -> ExitCode {
    let (wasm, bytes) = match build_component(dir) {
        Ok(b) => b,
        Err((code, e)) => return fail(code, e),
    };
    let path = match output {
        None => wasm,
        Some(o) => {
            if let Err(e) = std::fs::write(o, &bytes) {
                return fail(1, anyhow::anyhow!("cannot write {}: {e}", o.display()));
            }
            o.to_path_buf()
        }
    };
    println!(
        "{} {}",
        path.display(),
        wasmesh_proxy::runtime::Runtime::sha256(&bytes)
    );
    ExitCode::SUCCESS
}

/// Add the wasm32-wasip2 target through rustup when it is missing.
pub fn ensure_target() -> anyhow::Result<()> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc")?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .exists()
    {
        return Ok(());
    }
    eprintln!("the {TARGET} target is missing; running `rustup target add {TARGET}`");
    let ok = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "the Rust target {TARGET} is not installed; run `rustup target add {TARGET}` and try again"
        );
    }
    Ok(())
}

fn cargo_build(manifest: &Path) -> anyhow::Result<PathBuf> {
    let out = cargo_command(manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("cargo build failed (see its output above)");
    }
    built_component(&out.stdout, manifest)
}

/// `cargo build` of the plugin crate `manifest` for wasm, in release, its
/// messages as JSON on stdout (read by [`built_component`]).
pub fn cargo_command(manifest: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "--release",
        "--target",
        TARGET,
        "--message-format=json-render-diagnostics",
    ])
    .arg("--manifest-path")
    .arg(manifest)
    .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

/// The component a successful [`cargo_command`] wrote, from its messages.
pub fn built_component(stdout: &[u8], manifest: &Path) -> anyhow::Result<PathBuf> {
    let mut wasm = None;
    for line in String::from_utf8_lossy(stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let is_cdylib = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "cdylib"));
        if !is_cdylib {
            continue;
        }
        if let Some(files) = msg["filenames"].as_array() {
            for f in files.iter().filter_map(|f| f.as_str()) {
                if f.ends_with(".wasm") {
                    wasm = Some(PathBuf::from(f));
                }
            }
        }
    }
    wasm.ok_or_else(|| {
        anyhow::anyhow!(
            "the build produced no component: is {} a plugin crate (`crate-type = [\"cdylib\"]`)?",
            manifest.display()
        )
    })
}

/// `wasmesh plugin export NAME -o FILE`.
pub fn export(name: &str, output: &Path) -> ExitCode {
    let name = name.strip_prefix("builtin:").unwrap_or(name);
    let Some((_, bytes)) = wasmesh_artifacts::BUILTINS.iter().find(|(n, _)| *n == name) else {
        let known: Vec<&str> = wasmesh_artifacts::BUILTINS
            .iter()
            .map(|(n, _)| *n)
            .collect();
        return fail(
            2,
            anyhow::anyhow!(
                "no builtin plugin named {name:?}; known: {}",
                known.join(", ")
            ),
        );
    };
    if let Err(e) = std::fs::write(output, bytes) {
        return fail(1, anyhow::anyhow!("cannot write {}: {e}", output.display()));
    }
    println!(
        "{} {}",
        output.display(),
        wasmesh_proxy::runtime::Runtime::sha256(bytes)
    );
    ExitCode::SUCCESS
}
