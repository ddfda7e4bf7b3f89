//! deploy/: every kustomization renders with `kubectl kustomize`, every
//! rendered object validates against Kubernetes 1.32's schemas
//! (`kubernetes-validate --strict`, offline, from PyPI), the objects hang
//! together (probes name real ports, mounts real volumes, every wasmesh flag
//! exists), and the Dockerfile names what the workspace has.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::WASMESH;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every directory under deploy/kubernetes with a kustomization.
fn kustomizations() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root().join("deploy/kubernetes")];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.file_name().is_some_and(|n| n == "kustomization.yaml") {
                out.push(dir.clone());
            }
        }
    }
    out.sort();
    out
}

/// Validate rendered YAML against Kubernetes 1.32's schemas, strictly
/// (unknown fields refused).
fn validate(dir: &Path, yaml: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", "1.32.0"])
        .arg(file.path())
        .output()
        .expect(
            "kubernetes-validate must be installed to check deploy/: `pip install kubernetes-validate` in a venv on PATH (.ci/run does it)",
        );
    assert!(
        out.status.success(),
        "{} does not validate against Kubernetes 1.32:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn render(dir: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(dir)
        .output()
        .expect("kubectl (1.32, with kustomize) must be installed to check deploy/");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    validate(dir, &text);
    text.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml_ng::from_str(d).unwrap())
        .collect()
}

/// The long flags `wasmesh SUBCOMMAND --help` lists.
fn flags(subcommand: &str) -> String {
    let out = Command::new(WASMESH)
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn check_pod(what: &str, spec: &serde_json::Value) {
    let volumes: Vec<&str> = spec["volumes"]
        .as_array()
        .map(|v| v.iter().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default();
    for c in spec["containers"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        assert!(c["image"].is_string(), "{what}/{name}: no image");
        let ports: Vec<&str> = c["ports"]
            .as_array()
            .map(|p| p.iter().filter_map(|p| p["name"].as_str()).collect())
            .unwrap_or_default();
        for probe in ["readinessProbe", "livenessProbe"] {
            let p = &c[probe];
            let port = p["httpGet"]["port"]
                .as_str()
                .or(p["tcpSocket"]["port"].as_str());
            if let Some(port) = port {
                assert!(
                    ports.contains(&port),
                    "{what}/{name}: {probe} names port {port}, not one of {ports:?}"
                );
            }
        }
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let v = m["name"].as_str().unwrap();
            assert!(
                volumes.contains(&v),
                "{what}/{name}: mounts {v}, not a volume of the pod"
            );
        }
        if c["image"].as_str().unwrap().starts_with("wasmesh") {
            let args: Vec<&str> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            let help = flags(args[0]);
            // Flags, not positional values.
            for a in args[1..].iter().filter(|a| a.starts_with("--")) {
                let flag = a.split('=').next().unwrap();
                assert!(
                    help.contains(&format!("{flag} "))
                        || help.contains(&format!("{flag}\n"))
                        || help.contains(&format!("{flag} <")),
                    "{what}/{name}: `wasmesh {}` has no {flag}",
                    args[0]
                );
            }
            let env: Vec<&str> = c["env"]
                .as_array()
                .map(|e| e.iter().filter_map(|e| e["name"].as_str()).collect())
                .unwrap_or_default();
            for a in &args {
                let mut rest = *a;
                while let Some(i) = rest.find("$(") {
                    let var = &rest[i + 2..i + rest[i..].find(')').unwrap()];
                    assert!(
                        env.contains(&var),
                        "{what}/{name}: {a} uses $({var}), not in its env"
                    );
                    rest = &rest[i + 2..];
                }
            }
        }
    }
}

#[test]
fn every_kustomization_renders_and_hangs_together() {
    let dirs = kustomizations();
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    for expected in [
        "deploy/kubernetes/control",
        "deploy/kubernetes/demo",
        "deploy/kubernetes/example",
        "deploy/kubernetes/sidecar",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    for dir in &dirs {
        // A component renders only inside a kustomization that uses it.
        let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
        if text.contains("kind: Component") {
            continue;
        }
        let objects = render(dir);
        assert!(!objects.is_empty(), "{} renders nothing", dir.display());
        for o in &objects {
            let what = format!(
                "{}: {} {}",
                dir.display(),
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            );
            assert!(o["apiVersion"].is_string(), "{what}: no apiVersion");
            if o["kind"] == "Deployment" {
                let spec = &o["spec"];
                let selector = spec["selector"]["matchLabels"].as_object().unwrap();
                let labels = spec["template"]["metadata"]["labels"].as_object().unwrap();
                for (k, v) in selector {
                    assert_eq!(
                        labels.get(k),
                        Some(v),
                        "{what}: the selector does not select its pods"
                    );
                }
                check_pod(&what, &spec["template"]["spec"]);
            }
        }
    }
    // The example got its sidecar, beside its app.
    let example = render(&root().join("deploy/kubernetes/example"));
    let d = example.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let mut containers: Vec<&str> = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    containers.sort();
    assert_eq!(containers, ["app", "wasmesh-proxy"]);
    // The demo: every app of `wasmesh demo`, each with its sidecar, each
    // run as a role `wasmesh demo-app` knows.
    let demo = render(&root().join("deploy/kubernetes/demo"));
    let roles = flags("demo-app");
    let mut apps = Vec::new();
    for d in demo.iter().filter(|o| o["kind"] == "Deployment") {
        let containers = d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), 2, "{d}");
        let app = containers.iter().find(|c| c["name"] == "app").unwrap();
        let role = app["args"][1].as_str().unwrap();
        assert_eq!(app["args"][0], "demo-app");
        assert!(
            roles.contains(&format!("- {role}:")),
            "no role {role}:\n{roles}"
        );
        apps.push(role.to_string());
    }
    apps.sort();
    assert_eq!(
        apps,
        [
            "details",
            "loadgen",
            "productpage",
            "ratings",
            "reviews-v1",
            "reviews-v2",
            "reviews-v3"
        ]
    );
}

#[test]
fn the_dockerfile_names_what_the_workspace_has() {
    let docker = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    // The toolchain: the workspace's rust-version.
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        docker.contains(&format!("FROM rust:{version}-")),
        "not rust {version}"
    );
    assert!(
        docker.contains(&format!("RUSTUP_TOOLCHAIN={version}.")),
        "not rust {version}"
    );
    // The package and its binary.
    assert!(manifest.contains("[package]\nname = \"wasmesh\""));
    assert!(manifest.contains("[[bin]]\nname = \"wasmesh\""));
    let build = docker.lines().find(|l| l.contains("cargo build")).unwrap();
    assert!(build.contains("-p wasmesh "), "{build}");
    let target = build
        .split("--target ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    // The target it builds for is added, and so is the plugins' target
    // (the build compiles the stock plugins).
    let add = docker
        .lines()
        .find(|l| l.contains("rustup target add"))
        .unwrap();
    assert!(
        add.contains(target) && add.contains("wasm32-wasip2"),
        "{add}"
    );
    assert!(target.ends_with("-musl"), "a static binary: {target}");
    let built = format!("target/{target}/release/wasmesh");
    assert!(
        docker.contains(&format!("cp {built} /wasmesh")),
        "copies {built}"
    );
    assert!(docker.contains("COPY --from=build /wasmesh /usr/local/bin/wasmesh"));
    assert!(docker.contains("ENTRYPOINT [\"/usr/local/bin/wasmesh\"]"));
    // The build context is the repository: what it copies exists, and
    // what it leaves out is only build output.
    assert!(docker.contains("COPY . ."));
    let ignore = std::fs::read_to_string(root().join("deploy/Dockerfile.dockerignore")).unwrap();
    for line in ignore
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        assert!(
            ["target", ".git", "fuzz/target", "fuzz/corpus"].contains(&line.trim()),
            "{line} is left out of the build context"
        );
    }
    assert!(
        root().join("Cargo.lock").exists(),
        "--locked needs Cargo.lock"
    );
}
