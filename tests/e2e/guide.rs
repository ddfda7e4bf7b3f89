//! docs/plugin-guide.md, run as written: its `sh` blocks, in order, in one
//! bash in a fresh directory outside the repository, with this build's
//! `wasmesh` first on PATH — then what the guide says you will see is
//! checked against what the commands printed, and nothing it started is
//! left running.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::WASMESH;

/// The guide's shell blocks, in order.
fn commands(markdown: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in markdown.lines() {
        if !inside && line.trim_end() == "```sh" {
            inside = true;
        } else if inside && line.trim_end() == "```" {
            inside = false;
        } else if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Whether anything listens on `port` of 127.0.0.1.
fn bound(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

const PORTS: [u16; 8] = [15001, 15002, 15003, 15004, 15010, 15011, 15012, 18080];

#[test]
fn the_plugin_guide_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("docs/plugin-guide.md")).unwrap();
    let script = format!("set -euo pipefail\n{}", commands(&guide));
    assert!(script.contains("wasmesh plugin new"), "{script}");
    for p in PORTS {
        assert!(!bound(p), "port {p} is taken before the guide runs");
    }
    let dir = tempfile::tempdir().unwrap();
    // Shared with cli.rs's plugin test: one incremental target directory,
    // one SDK copy.
    let target = root.join("target/plugin-new-test");
    let bin = Path::new(WASMESH).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path)
        .env("CARGO_TARGET_DIR", &target)
        .env("XDG_DATA_HOME", target.join("data"))
        .env("RUST_LOG", "info")
        .env_remove("WASMESH_CONTROL")
        .env_remove("WASMESH_ADMIN_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let group = child.id();
    let kill_group = || {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .status();
    };
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whatever happened, nothing the guide started outlives it.
    kill_group();
    let _ = child.wait();
    let out = out_reader.join().unwrap();
    let err = err_reader.join().unwrap();
    let logs: String = ["proxy.log", "control.log", "sidecar.log"]
        .iter()
        .map(|f| {
            let text =
                std::fs::read_to_string(dir.path().join("visits").join(f)).unwrap_or_default();
            format!("--- {f}\n{text}")
        })
        .collect();
    let status =
        status.unwrap_or_else(|| panic!("the guide ran past 10 minutes:\n{out}\n{err}\n{logs}"));
    assert!(
        status.success(),
        "the guide failed ({status}):\n{out}\n{err}\n{logs}"
    );

    // What the guide says you will see, in order.
    let lines: Vec<String> = out.lines().map(|l| l.trim_end().to_lowercase()).collect();
    let mut at = 0;
    for expected in [
        "test result: ok. 4 passed",
        "x-hello: hello from my sidecar",
        "x-visits: 1",
        "x-visits: 2",
        "visits@0.1.0 ",
        "x-hello: hello from the mesh",
        "x-visits: 1",
        "x-hello: hello again",
        "x-visits: 2",
    ] {
        match lines[at..].iter().position(|l| l.contains(expected)) {
            Some(i) => at += i + 1,
            None => panic!("{expected:?} missing after line {at} of:\n{out}\n{err}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in PORTS {
        while bound(p) {
            assert!(
                Instant::now() < deadline,
                "port {p} still bound after the guide"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
