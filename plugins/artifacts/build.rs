//! Builds every plugin crate of the workspace for `wasm32-wasip2` (the pattern
//! of wasmtime's `test-programs` artifacts crate), so that `cargo build`,
//! `cargo test` and `cargo run` need no extra step, and writes
//! `$OUT_DIR/artifacts.rs` with their paths.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

/// (package, constant name, stock plugin shipped in the binary?)
#[path = "table_bomb.rs"]
mod table_bomb;

const PLUGINS: &[(&str, &str, bool)] = &[
    ("add-header", "ADD_HEADER", true),
    ("deny-path", "DENY_PATH", true),
    ("router", "ROUTER", true),
    ("fault-injection", "FAULT_INJECTION", true),
    ("retry", "RETRY", true),
    ("circuit-breaker", "CIRCUIT_BREAKER", true),
    ("authz", "AUTHZ", true),
    ("ratelimit", "RATELIMIT", true),
    ("fixture-looper", "LOOPER", false),
    ("fixture-membomb", "MEMBOMB", false),
    ("fixture-trapper", "TRAPPER", false),
    ("fixture-rejecter", "REJECTER", false),
    ("fixture-stdlib", "STDLIB", false),
    ("fixture-wrongversion", "WRONG_VERSION", false),
    ("fixture-nop", "NOP", false),
    ("fixture-hostile", "HOSTILE", false),
    ("fixture-bigmem", "BIGMEM", false),
    ("fixture-probe", "PROBE", false),
    ("fixture-contract-0-1-0", "CONTRACT_0_1_0", false),
];

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "wasm-plugin";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.join("../..").canonicalize().unwrap();
    for dir in ["plugins", "plugin-sdk", "wit", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: keep the wasm
    // builds in one stable place under <target> so they stay incremental.
    let target_dir = out_dir.ancestors().nth(4).unwrap().join("wasm-plugins");

    ensure_target();

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--target", TARGET, "--profile", PROFILE])
        .arg("--target-dir")
        .arg(&target_dir);
    for (pkg, _, _) in PLUGINS {
        cmd.args(["-p", pkg]);
    }
    // The outer build's flags are for the host target; don't pass them on.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the wasm plugins");
    assert!(
        status.success(),
        "building the plugins for {TARGET} failed (see the output above)"
    );

    let wasm_dir = target_dir.join(TARGET).join(PROFILE);
    let mut src = String::new();
    let mut builtins = String::new();
    for (pkg, konst, stock) in PLUGINS {
        let path = wasm_dir.join(format!("{}.wasm", pkg.replace('-', "_")));
        assert!(path.exists(), "expected {} after the build", path.display());
        src.push_str(&format!(
            "/// Path of the `{pkg}` component.\npub const {konst}: &str = {:?};\n",
            path.display().to_string()
        ));
        if *stock {
            let name = pkg;
            builtins.push_str(&format!(
                "    ({name:?}, include_bytes!({:?})),\n",
                path.display().to_string()
            ));
        }
    }
    let bomb = out_dir.join("fixture_tablebomb.wasm");
    table_bomb::write(&root.join("wit"), &bomb);
    src.push_str(&format!(
        "/// Path of the hand-assembled table-growth bomb component.\npub const TABLE_BOMB: &str = {:?};\n",
        bomb.display().to_string()
    ));
    src.push_str(&format!(
        "/// The stock plugins shipped in the binary, by `builtin:` name.\npub const BUILTINS: &[(&str, &[u8])] = &[\n{builtins}];\n"
    ));
    fs::write(out_dir.join("artifacts.rs"), src).unwrap();
}

/// Make sure the wasm target is installed: add it with rustup when missing
/// (rustup's auto-install is off on our machines), or stop with the command.
fn ensure_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let installed = |root: &str| Path::new(root).join("lib/rustlib").join(TARGET).exists();
    if let Some(root) = &sysroot
        && installed(root)
    {
        return;
    }
    println!("cargo:warning=the {TARGET} target is missing; running `rustup target add {TARGET}`");
    let added = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !added || !sysroot.as_deref().is_some_and(installed) {
        panic!(
            "the Rust target {TARGET} is not installed and could not be added; run `rustup target add {TARGET}` and build again"
        );
    }
}
