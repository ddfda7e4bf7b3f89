//! The CLI: exit codes and messages for bad input, and the plugin author's
//! `plugin new` / `plugin build` path outside the repository.

use std::process::{Command, Output};

use crate::support::*;

/// Run `wasmesh proxy` on a mesh file made of `head` (listener lines) and
/// `yaml`; returns when the process exits.
fn proxy_file(head: &str, yaml: &str) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), format!("{head}{yaml}")).unwrap();
    let out = Command::new(WASMESH)
        .args(["proxy", "--config"])
        .arg(dir.path().join("mesh.yaml"))
        .output()
        .unwrap();
    (out, dir)
}

fn proxy_with(yaml: &str) -> (Output, tempfile::TempDir) {
    let head = format!(
        "admin: 127.0.0.1:{}\nlisten: 127.0.0.1:{}\n",
        free_port(),
        free_port()
    );
    proxy_file(&head, yaml)
}

fn refused(yaml: &str, expect: &[&str]) {
    let (out, _dir) = proxy_with(yaml);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for e in expect {
        assert!(err.contains(e), "expected {e:?} in:\n{err}");
    }
}

#[test]
fn bad_configuration_exits_2_naming_file_field_and_plugin() {
    refused("services: [", &["mesh.yaml", "invalid configuration"]);
    refused("bogus: 1\n", &["unknown field `bogus`"]);
    refused(
        "runtime: { pool-size: many }\n",
        &["mesh.yaml: runtime.pool-size: invalid type: string \"many\""],
    );
    refused(
        "services:\n  reviews:\n    plugins:\n      - source: builtin:deny-path\n        on-failure: sideways\n",
        &["services.reviews.plugins[0].on-failure", "sideways"],
    );
    refused(
        "services:\n  reviews:\n    plugins:\n      - source: builtin:deny-path\n        match: [{ uri: { prefix: /a } }, { uri: { regex: \"(\" } }]\n",
        &["mesh.yaml: services.reviews.plugins[0].match[1].uri.regex: "],
    );
    refused(
        "services:\n  reviews:\n    plugins:\n      - source: builtin:deny-path\n        match: [{ path: { prefix: /a } }]\n",
        &["services.reviews.plugins[0].match[0].path: unknown field `path`"],
    );
    refused(
        "services:\n  reviews:\n    plugins:\n      - source: builtin:deny-path\n        config: { prefixes: [admin] }\n",
        &[
            "plugin deny-path (",
            "services.reviews.plugins[0].config",
            "config.prefixes[0]",
            "must start with '/'",
        ],
    );
    refused(
        &format!(
            "services:\n  reviews:\n    plugins:\n      - source: {:?}\n",
            wasmesh_artifacts::REJECTER
        ),
        &[
            "plugin fixture-rejecter (",
            "refused its configuration",
            "config.mode",
        ],
    );
    // A fixed on-request decision the host would refuse from on-request
    // refuses the configuration, naming the plugin and the header.
    refused(
        &format!(
            "services:\n  reviews:\n    plugins:\n      - {{ source: {:?}, name: fixed, config: {{ mode: fixed-bad-header }} }}\n",
            wasmesh_artifacts::PROBE
        ),
        &[
            "services.reviews.plugins[0]",
            "plugin fixed (",
            "on-request-fixed: ",
            "x-bad",
        ],
    );
    // So does an on-request-table the host cannot read, naming the rule
    // and the field.
    refused(
        &format!(
            "services:\n  reviews:\n    plugins:\n      - {{ source: {:?}, name: tabled, config: {{ mode: table-bad-match }} }}\n",
            wasmesh_artifacts::PROBE
        ),
        &[
            "services.reviews.plugins[0]",
            "plugin tabled (",
            "on-request-table: rules[1].when",
            "urii",
        ],
    );
    // A plugin's refusal names the operator's file and field first, then
    // the plugin, then its field in the plugin's terms — with no line and
    // column of the JSON the proxy made from the YAML.
    let (out, _dir) = proxy_with(
        "services:\n  reviews:\n    plugins:\n      - source: builtin:ratelimit\n        config: { requestsPerSecond: fast }\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "mesh.yaml: services.reviews.plugins[0].config: the plugin ratelimit ("
        ) && err.contains(
            ", builtin:ratelimit) refused its configuration: config.requestsPerSecond: invalid type: string \"fast\", expected f64\n"
        ),
        "{err}"
    );
    assert!(!err.contains("line 1"), "{err}");
    refused(
        "services:\n  reviews:\n    plugins:\n      - source: builtin:deny-path\n        config: { prefixes: [] }\n      - source: builtin:deny-path\n        config: { prefixes: [] }\n",
        &["services.reviews.plugins[1].name", "already in this chain"],
    );
    refused(
        "services:\n  reviews:\n    plugins:\n      - source: ./missing.wasm\n",
        &["services.reviews.plugins[0].source", "missing.wasm"],
    );
    refused(
        "services:\n  reviews:\n    plugins:\n      - source: builtin:nope\n",
        &["unknown builtin \"nope\"", "builtin:deny-path"],
    );
    refused(
        "services:\n  reviews:\n    endpoints: { v1: [\"localhost\"] }\n",
        &["services.reviews.endpoints.v1[0]", "ip:port"],
    );
    refused(
        &format!(
            "services:\n  reviews:\n    plugins:\n      - source: builtin:add-header\n        sha256: \"{}\"\n",
            "0".repeat(64)
        ),
        &[
            "services.reviews.plugins[0].sha256",
            &format!("not the {} this entry expects", "0".repeat(64)),
        ],
    );
    refused(
        "services:\n  reviews:\n    plugins:\n      - source: builtin:add-header\n        sha256: \"00\"\n",
        &[
            "services.reviews.plugins[0].sha256: \"00\" is not a sha256",
            "write 64 hex digits",
        ],
    );
    refused(
        &format!("# {}\n", "x".repeat(5 << 20)),
        &["mesh.yaml", "over the 4194304-byte limit for a mesh file"],
    );
}

#[test]
fn a_component_whose_initial_memory_is_over_the_cap_is_refused() {
    let yaml = format!(
        "services:\n  reviews:\n    plugins:\n      - source: {:?}\n",
        wasmesh_artifacts::BIGMEM
    );
    refused(
        &yaml,
        &[
            "plugin fixture-bigmem (",
            "services.reviews.plugins[0].config",
            "needs more memory than runtime.memory-limit (16777216 bytes)",
        ],
    );
}

#[test]
fn a_pathological_regex_is_refused_with_its_field() {
    refused(
        "services:\n  reviews:\n    plugins:\n      - source: builtin:router\n        config:\n          http:\n            - match: [{ uri: { regex: \"((a{100}){100}){100}\" } }]\n              route: [{ destination: { subset: v1 } }]\n",
        &["plugin router (", "config.http[0].match[0].uri.regex"],
    );
}

#[test]
fn a_compile_past_its_timeout_is_abandoned_and_refused() {
    // Any real component takes well over 1 ms to compile.
    let yaml = format!(
        "runtime: {{ compile-timeout: 1ms }}\nservices:\n  reviews:\n    plugins:\n      - source: {:?}\n",
        wasmesh_artifacts::TRAPPER
    );
    refused(
        &yaml,
        &[
            "plugin fixture-trapper (",
            "services.reviews.plugins[0].source",
            "longer than runtime.compile-timeout (1ms)",
            "abandoned",
        ],
    );
    refused(
        "runtime: { compile-timeout: 0s }\n",
        &["runtime.compile-timeout: must be between 1ms and 10m, not \"0s\""],
    );
}

#[test]
fn a_component_that_is_not_a_plugin_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk.wasm"), b"\0asm\x01\0\0\0").unwrap();
    let yaml = format!(
        "services:\n  reviews:\n    plugins:\n      - source: {:?}\n",
        dir.path().join("junk.wasm")
    );
    refused(
        &yaml,
        &["plugin junk (", "not a valid WebAssembly component"],
    );
}

#[test]
fn a_component_built_against_another_contract_version_is_refused() {
    let yaml = format!(
        "services:\n  reviews:\n    plugins:\n      - source: {:?}\n",
        wasmesh_artifacts::WRONG_VERSION
    );
    refused(
        &yaml,
        &[
            "plugin fixture-wrongversion (",
            "services.reviews.plugins[0].source",
            "not a wasmesh plugin this proxy can run",
            "wasmesh:plugin/filter@0.1.x",
        ],
    );
}

#[test]
fn a_port_in_use_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let head = format!(
        "admin: 127.0.0.1:{}\nlisten: {}\n",
        free_port(),
        taken.local_addr().unwrap()
    );
    let (out, _dir) = proxy_file(&head, "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot listen on"), "{err}");
}

#[test]
fn plugin_new_then_test_then_build_works_outside_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    // Share one target directory across runs so this stays an incremental build.
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/plugin-new-test");
    // The SDK `plugin new` writes out of the binary, as for an installed
    // wasmesh: kept beside the target directory (its name changes with its
    // contents).
    let data = target.join("data");
    let run = |args: &[&str], cwd: &std::path::Path| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .current_dir(cwd)
            .env("CARGO_TARGET_DIR", &target)
            .env("XDG_DATA_HOME", &data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    run(&[WASMESH, "plugin", "new", "hello"], dir.path());
    let crate_dir = dir.path().join("hello");
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    let sdk = data.join("wasmesh/sdk");
    assert!(
        manifest.contains(&format!("path = \"{}", sdk.display())),
        "the crate depends on the SDK the binary wrote out, not on the repository:\n{manifest}"
    );
    let test = run(&["cargo", "test"], &crate_dir);
    let text = String::from_utf8_lossy(&test.stdout);
    assert!(text.contains("test result: ok. 4 passed"), "{text}");
    let out = run(
        &[WASMESH, "plugin", "build", "-o", "hello.wasm"],
        &crate_dir,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stdout: {stdout:?}");
    let (path, sha) = lines[0].split_once(' ').unwrap();
    assert_eq!(path, "hello.wasm");
    let path = crate_dir.join(path);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(sha, wasmesh_proxy::runtime::Runtime::sha256(&bytes));

    // And the proxy runs it.
    let (out, _d) = proxy_with(&format!(
        "services:\n  reviews:\n    plugins:\n      - source: {path:?}\n        config: {{ greeting: \"\" }}\n"
    ));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.greeting: must not be empty"));

    let out = Command::new(WASMESH)
        .args(["plugin", "new", "hello"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an existing directory is refused"
    );
}

#[test]
fn plugin_export_writes_a_builtin_the_proxy_loads_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(WASMESH)
        .args(["plugin", "export", "router", "-o"])
        .arg(dir.path().join("router.wasm"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let (path, sha) = line.trim().split_once(' ').unwrap();
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(sha, wasmesh_proxy::runtime::Runtime::sha256(&bytes));
    assert_eq!(bytes, std::fs::read(wasmesh_artifacts::ROUTER).unwrap());
    // The file, pinned by its sha256, is what `source: builtin:router` is.
    let (out, _d) = proxy_with(&format!(
        "services:\n  reviews:\n    plugins:\n      - source: {path:?}\n        sha256: \"{sha}\"\n        config: {{ http: [{{ bogus: 1 }}] }}\n"
    ));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `bogus`"));

    let out = Command::new(WASMESH)
        .args(["plugin", "export", "nope", "-o", "/dev/null"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("known: add-header, deny-path, router"));
}

/// The proxy compiles components in a child process running its own
/// executable (`wasmesh __compile-component`): component on stdin, the
/// engine's artifact on stdout; anything else is refused on stderr, exit 1.
#[test]
fn the_compiler_process_turns_a_component_into_an_artifact_or_says_why_not() {
    use std::io::Write;
    let run = |input: &[u8]| {
        let mut child = Command::new(WASMESH)
            .arg("__compile-component")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let ok = run(&std::fs::read(wasmesh_artifacts::NOP).unwrap());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        &ok.stdout[..4],
        b"\x7fELF",
        "a wasmtime artifact is an ELF image"
    );

    let bad = run(b"not a component");
    assert_eq!(bad.status.code(), Some(1));
    assert!(bad.stdout.is_empty());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("magic header") || err.contains("wasm"),
        "{err}"
    );
}

/// `--store etcd://…` in a build without the `etcd` feature: refused with
/// how to build one; `--store` without its key file: a usage error.
#[test]
#[cfg(not(feature = "etcd"))]
fn control_on_etcd_needs_a_build_with_the_etcd_feature() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let run = |args: &[&str]| {
        Command::new(WASMESH)
            .args([
                "control",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
            .args([
                "--listen-tls",
                "127.0.0.1:0",
                "--store",
                "etcd://127.0.0.1:2379",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--admin-token-file", &p("t"), "--store-key-file", &p("k")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "built without etcd support; build it with `cargo build --release --features etcd`"
        ),
        "{err}"
    );
    let out = run(&["--admin-token-file", &p("t")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--store-key-file"), "{err}");
}
