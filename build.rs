//! Link the `wasmesh` binary with packed relative relocations
//! (`-z pack-relative-relocs`, DT_RELR) when the toolchain and C library
//! support them: a position-independent executable of this size otherwise
//! carries ≈ 0.9 MB of relocation records that the loader reads once at
//! start-up and every sidecar then keeps resident.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux")
        || env::var("HOST") != env::var("TARGET")
    {
        return;
    }
    if supported() {
        println!("cargo:rustc-link-arg-bins={FLAG}");
    } else {
        println!(
            "cargo:warning=linking without {FLAG} (needs binutils ≥ 2.38 and glibc ≥ 2.36): the binary works, with ≈ 1 MB more resident"
        );
    }
}

/// Link and run a trivial C program with the flag: proves the linker
/// accepts it and this C library's loader runs the result.
fn supported() -> bool {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let (src, exe) = (out.join("relr.c"), out.join("relr"));
    if std::fs::write(&src, "int main(void) { return 0; }\n").is_err() {
        return false;
    }
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let linked = Command::new(cc)
        .arg(FLAG)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .is_ok_and(|o| o.status.success());
    linked && Command::new(&exe).status().is_ok_and(|s| s.success())
}
