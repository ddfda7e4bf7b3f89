//! `--watch`: live swaps with zero failed requests; refused reloads keep the
//! previous snapshot serving and show in `/config`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

fn versioned(upstream: &Upstream, v: u32) -> String {
    format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{}"] }}
    plugins:
      - source: ./plugin.wasm
        name: tagger
        config: {{ request: {{ x-v: "{v}" }}, response: {{ x-v: "{v}" }} }}
"#,
        upstream.addr
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn swapping_a_plugin_under_load_fails_no_request() {
    swap_under_load("2").await;
}

/// The same on one worker thread (tokio's current-thread scheduler): the
/// swap is built on the blocking pool while that thread keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn swapping_a_plugin_under_load_on_one_worker_fails_no_request() {
    swap_under_load("1").await;
}

async fn swap_under_load(threads: &str) {
    let up = Upstream::echo("up").await;
    let dir = tempfile::tempdir().unwrap();
    copy_into(wasmesh_artifacts::ADD_HEADER, dir.path(), "plugin.wasm");
    let proxy = Proxy::start_in(dir, &versioned(&up, 0), &["--watch", "--workers", threads]).await;

    let stop = Arc::new(AtomicBool::new(false));
    // Responses seen per version, while the load runs.
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let listen = proxy.listen;
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, seen) = (stop.clone(), seen.clone());
        workers.push(tokio::spawn(async move {
            let (mut failed, mut mixed) = (Vec::new(), 0usize);
            while !stop.load(Ordering::SeqCst) {
                let req = http::Request::get(format!("http://{listen}/"))
                    .header("host", "reviews")
                    .body(http_body_util::Full::default())
                    .unwrap();
                match send(http1(), req).await {
                    Ok(r) if r.status == 200 => {
                        let resp_v = r.header("x-v").unwrap_or("none").to_string();
                        let req_v = r.json()["headers"]["x-v"]
                            .as_str()
                            .unwrap_or("none")
                            .to_string();
                        if resp_v != req_v || resp_v == "none" {
                            mixed += 1;
                        }
                        *seen.lock().unwrap().entry(resp_v).or_default() += 1;
                    }
                    Ok(r) => failed.push(format!("{} {:?}", r.status, r.body)),
                    Err(e) => failed.push(e),
                }
            }
            (failed, mixed)
        }));
    }

    // Each version serves a good share of the load before the next swap:
    // the swaps land while requests are in flight on every version.
    let served = |v: u32| {
        seen.lock()
            .unwrap()
            .get(&v.to_string())
            .copied()
            .unwrap_or(0)
    };
    let swaps = 6;
    for v in 0..=swaps {
        if v > 0 {
            proxy.rewrite(&versioned(&up, v));
            proxy.wait_version(u64::from(v) + 1).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while served(v) < 200 {
            assert!(
                Instant::now() < deadline,
                "version {v} served only {} requests in 30 s",
                served(v)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.store(true, Ordering::SeqCst);

    let (mut failed, mut mixed) = (Vec::new(), 0);
    for w in workers {
        let (f, m) = w.await.unwrap();
        failed.extend(f);
        mixed += m;
    }
    let seen = seen.lock().unwrap().clone();
    println!(
        "swap under load, {threads} worker(s): {seen:?}, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(mixed, 0, "responses mixing two versions");
    let cfg = proxy.config().await;
    assert_eq!(cfg["version"], u64::from(swaps) + 1);
    assert!(cfg["last_error"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_component_file_is_picked_up() {
    let up = Upstream::echo("up").await;
    let dir = tempfile::tempdir().unwrap();
    // The stdlib fixture ignores its config; deny-path will read it.
    copy_into(wasmesh_artifacts::STDLIB, dir.path(), "plugin.wasm");
    let yaml = format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{}"] }}
    plugins:
      - source: ./plugin.wasm
        name: swapped
        config: {{ prefixes: ["/admin"] }}
"#,
        up.addr
    );
    let proxy = Proxy::start_in(dir, &yaml, &["--watch"]).await;
    assert_eq!(via(&proxy, "reviews", "/admin").await.status, 200);
    replace_file(
        &proxy.dir.path().join("plugin.wasm"),
        &std::fs::read(wasmesh_artifacts::DENY_PATH).unwrap(),
    );
    proxy.wait_version(2).await;
    let r = via(&proxy, "reviews", "/admin").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (403, Some("LR")));
    let sha = proxy.config().await["services"][0]["plugins"][0]["sha256"].clone();
    let expected = wasmesh_proxy::runtime::Runtime::sha256(
        &std::fs::read(wasmesh_artifacts::DENY_PATH).unwrap(),
    );
    assert_eq!(sha, expected.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_reload_keeps_serving_and_shows_in_config() {
    let up = Upstream::echo("up").await;
    let dir = tempfile::tempdir().unwrap();
    copy_into(wasmesh_artifacts::ADD_HEADER, dir.path(), "plugin.wasm");
    let proxy = Proxy::start_in(dir, &versioned(&up, 1), &["--watch"]).await;

    let wait_error = || async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let cfg = proxy.config().await;
            if !cfg["last_error"].is_null() || Instant::now() > deadline {
                return cfg;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    // A field with a bad value.
    proxy.rewrite(
        &versioned(&up, 2).replace("name: tagger", "name: tagger\n        on-failure: sideways"),
    );
    let cfg = wait_error().await;
    let err = &cfg["last_error"];
    assert_eq!(
        err["path"], "services.reviews.plugins[0].on-failure",
        "{cfg}"
    );
    assert!(
        err["reason"].as_str().unwrap().contains("sideways"),
        "{cfg}"
    );
    assert!(
        err["source"].as_str().unwrap().ends_with("mesh.yaml"),
        "{cfg}"
    );
    assert_eq!(cfg["version"], 1);
    let r = via(&proxy, "reviews", "/").await;
    assert_eq!(
        (r.status, r.header("x-v")),
        (200, Some("1")),
        "the previous snapshot serves"
    );
    assert!(
        proxy
            .log_text()
            .contains("services.reviews.plugins[0].on-failure")
    );
    proxy
        .metrics_containing(r#"wasmesh_config_reloads_total{result="refused"} 1"#)
        .await;

    // A good file clears it.
    proxy.rewrite(&versioned(&up, 3));
    proxy.wait_version(2).await;
    assert!(proxy.config().await["last_error"].is_null());

    // A component that is not a component.
    replace_file(&proxy.dir.path().join("plugin.wasm"), b"\0asm not really");
    let cfg = wait_error().await;
    let err = &cfg["last_error"];
    assert_eq!(err["path"], "services.reviews.plugins[0].source", "{cfg}");
    // Named against the operator's file; the plugin in the reason.
    assert_eq!(
        err["source"],
        proxy.config_path().display().to_string(),
        "{cfg}"
    );
    let reason = err["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("the plugin tagger (")
            && reason.contains("plugin.wasm) cannot be loaded")
            && reason.contains("not a valid WebAssembly component"),
        "{cfg}"
    );
    assert_eq!(via(&proxy, "reviews", "/").await.header("x-v"), Some("3"));

    // Listener changes need a restart.
    std::fs::write(
        proxy.config_path(),
        format!(
            "admin: {}\nlisten: 127.0.0.1:1\n{}",
            proxy.admin,
            versioned(&up, 4)
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cfg = proxy.config().await;
        if cfg["last_error"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("restart"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{cfg}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(via(&proxy, "reviews", "/").await.header("x-v"), Some("3"));
}

/// Sidecars started together on one compile cache (one node's) compile
/// each component once between them: the others wait for its artifact and
/// map it.
#[tokio::test(flavor = "multi_thread")]
async fn sidecars_sharing_a_compile_cache_compile_a_plugin_once() {
    let up = Upstream::echo("up").await;
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("cache");
    let dir = dir.to_str().unwrap();
    let yaml = format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n    plugins:\n      - source: builtin:add-header\n        config: {{ request: {{ x-a: b }} }}\n",
        up.addr
    );
    let args = ["--compile-cache", dir];
    let (a, b, c) = tokio::join!(
        Proxy::start_with(&yaml, &args),
        Proxy::start_with(&yaml, &args),
        Proxy::start_with(&yaml, &args),
    );
    let mut compiled = 0;
    for proxy in [&a, &b, &c] {
        assert_eq!(via(proxy, "reviews", "/").await.status, 200);
        let log = proxy.log_text();
        let own = log.matches("component compiled").count();
        let read = log.matches("component read from the compile cache").count();
        assert_eq!(own + read, 1, "each sidecar loads the plugin once:\n{log}");
        compiled += own;
    }
    assert_eq!(compiled, 1, "one compile among the three sidecars");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_reads_compiled_plugins_from_the_compile_cache() {
    use std::os::unix::fs::PermissionsExt;
    let up = Upstream::echo("up").await;
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("cache");
    let dir_arg = dir.to_str().unwrap().to_string();
    let yaml = format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n    plugins:\n      - source: builtin:add-header\n        config: {{ request: {{ x-a: b }} }}\n",
        up.addr
    );
    let artifacts = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect()
    };
    // First run: compiles, writes the artifact into a directory it made 0700.
    let mut first = Proxy::start_with(&yaml, &["--compile-cache", &dir_arg]).await;
    assert_eq!(
        via(&first, "reviews", "/").await.json()["headers"]["x-a"],
        "b"
    );
    assert_eq!(first.terminate().code(), Some(0));
    assert_eq!(artifacts().len(), 1, "one component, one artifact");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // Second run: reads it instead of compiling.
    let mut second = Proxy::start_with(&yaml, &["--compile-cache", &dir_arg]).await;
    assert_eq!(
        via(&second, "reviews", "/").await.json()["headers"]["x-a"],
        "b"
    );
    assert!(
        second
            .log_text()
            .contains("component read from the compile cache"),
        "{}",
        second.log_text()
    );
    assert_eq!(second.terminate().code(), Some(0));

    // A corrupted artifact is never loaded: noticed, removed, compiled again.
    let file = &artifacts()[0];
    let mut bytes = std::fs::read(file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(file, bytes).unwrap();
    let third = Proxy::start_with(&yaml, &["--compile-cache", &dir_arg]).await;
    assert_eq!(
        via(&third, "reviews", "/").await.json()["headers"]["x-a"],
        "b"
    );
    assert!(
        third.log_text().contains("compile cache entry corrupt"),
        "{}",
        third.log_text()
    );
    drop(third);

    // A cache directory others can write to is refused.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new(WASMESH)
        .args([
            "proxy",
            "--compile-cache",
            &dir_arg,
            "--config",
            "/nonexistent.yaml",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("closed to others (chmod 700)"), "{err}");
}

/// The compiler process runs the file the proxy was started from (held
/// open), not whatever file now sits at its path: after the
/// binary on disk is replaced, as an upgrade in place does, a reload that
/// has to compile a new plugin still lands.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_compiles_after_the_binary_on_disk_was_replaced() {
    let up = Upstream::echo("v1").await;
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("wasmesh");
    std::fs::copy(WASMESH, &binary).unwrap();
    let service = |plugins: &str| {
        format!(
            "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n{plugins}",
            up.addr
        )
    };
    let proxy = Proxy::start_binary(&binary, dir, &service(""), &["--watch"]).await;
    assert_eq!(via(&proxy, "reviews", "/admin").await.status, 200);

    // A new file renamed over the old one: the running image is now deleted.
    let new = binary.with_extension("new");
    std::fs::write(&new, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::rename(&new, &binary).unwrap();

    proxy.rewrite(&service(
        "    plugins:\n      - source: builtin:deny-path\n        config: { prefixes: [\"/admin\"] }\n",
    ));
    proxy.wait_version(2).await;
    assert_eq!(via(&proxy, "reviews", "/admin").await.status, 403);
}
