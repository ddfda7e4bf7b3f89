//! The control plane end to end: real `wasmesh control`, real sidecars in
//! control mode, the real CLI. Push → apply → every proxy serves it and
//! `status --wait` returns; versions rolled under load with no failed
//! request; bad input refused with its reason and nothing changed; control
//! killed (-9) under load and restarted; a NACK kept by its proxy.

use std::time::{Duration, Instant};

use crate::support::*;

/// A mesh with `reviews` (the upstream, static endpoint) whose outbound
/// chain is `tagger@VERSION`, an add-header plugin pushed under that name,
/// which sets `x-v: VERSION` on the request.
fn tagged(upstream: &Upstream, version: u32) -> String {
    format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{}"] }}
    plugins:
      - source: tagger@{version}
        config: {{ request: {{ x-v: "{version}" }} }}
"#,
        upstream.addr
    )
}

/// Push the add-header component as `tagger@VERSION`.
fn push_tagger(control: &Control, version: u32) {
    control.push(
        wasmesh_artifacts::ADD_HEADER,
        "tagger",
        &version.to_string(),
    );
}

/// The request header `x-v` the upstream saw, through `proxy`.
async fn tag_through(proxy: &Proxy) -> Got {
    via(proxy, "reviews", "/").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pushed_plugin_applied_reaches_five_proxies_and_status_waits_for_them() {
    let data = tempfile::tempdir().unwrap();
    let control = Control::start(&data.path().join("control")).await;
    let up = Upstream::echo("reviews").await;
    let mut proxies = Vec::new();
    for i in 0..5 {
        let app = format!("127.0.0.1:{}", free_port());
        proxies.push(
            Proxy::start_control(
                &control.url(),
                "frontend",
                &format!("v{}", i % 2 + 1),
                &["--app", &app],
            )
            .await,
        );
    }
    control.wait_proxies(5).await;
    push_tagger(&control, 1);
    control.apply(&tagged(&up, 1));
    control.wait_rollout();
    for p in &proxies {
        let r = tag_through(p).await;
        assert_eq!(r.status, 200, "{}", p.log_text());
        assert_eq!(r.json()["headers"]["x-v"], "1");
    }
    let rows = control.proxies();
    assert_eq!(rows.len(), 5, "{rows:?}");
    for r in &rows {
        assert_eq!(r["state"], "ACK", "{r}");
        assert_eq!(r["applied"], r["latest"], "{r}");
    }
    // The proxies registered their apps as frontend's endpoints.
    let (_, out, _) = control.cli(&["get", "plugins", "-o", "json"]);
    let plugins: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plugins[0]["used_by"][0], "reviews");
    let cfg = proxies[0].config().await;
    let frontend = cfg["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "frontend");
    assert!(
        frontend.is_none(),
        "frontend is not applied, so not a service yet: {cfg}"
    );
    assert!(
        cfg["source"]
            .as_str()
            .unwrap()
            .starts_with("control snapshot"),
        "{cfg}"
    );
    // A chain entry's `match` reaches the proxies: the tagger now runs
    // for /tagged only.
    control.apply(&tagged(&up, 1).replace(
        "      - source: tagger@1\n",
        "      - source: tagger@1\n        match: [{ uri: { prefix: /tagged } }]\n",
    ));
    control.wait_rollout();
    for p in &proxies {
        assert_eq!(
            tag_through(p).await.json()["headers"]["x-v"],
            serde_json::Value::Null
        );
        let r = via(p, "reviews", "/tagged/1").await;
        assert_eq!(r.json()["headers"]["x-v"], "1", "{}", p.log_text());
    }
}

/// Ten successive versions pushed and applied while clients keep sending:
/// every request succeeds, and each proxy ends on the last version.
#[tokio::test(flavor = "multi_thread")]
async fn ten_versions_rolled_out_under_load_fail_no_request() {
    let data = tempfile::tempdir().unwrap();
    let control = Control::start(&data.path().join("control")).await;
    let up = Upstream::echo("reviews").await;
    push_tagger(&control, 0);
    control.apply(&tagged(&up, 0));
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(Proxy::start_control(&control.url(), "frontend", "v1", &[]).await);
    }
    control.wait_rollout();
    let listens: Vec<_> = proxies.iter().map(|p| p.listen).collect();
    let load = Load::start(&listens, "reviews", 1);
    for v in 1..=10 {
        push_tagger(&control, v);
        control.apply(&tagged(&up, v));
        control.wait_rollout();
        load.wait_more(30).await;
    }
    let (_, failed) = load.finish().await;
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    for p in &proxies {
        assert_eq!(tag_through(p).await.json()["headers"]["x-v"], "10");
    }
}

/// `component` with a custom section appended: other bytes (a new sha256),
/// the same plugin, as a rebuild would be.
fn rebuilt(component: &str, label: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(component).unwrap();
    let name = b"wasmesh-test";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(label.as_bytes());
    assert!(payload.len() < 128, "one LEB128 byte of size");
    bytes.push(0);
    bytes.push(payload.len() as u8);
    bytes.extend_from_slice(&payload);
    bytes
}

/// Wait (up to 60 s: it fetches and compiles) until `proxy`'s prefetch
/// counter for `result` is `n`.
async fn wait_prefetches(proxy: &Proxy, result: &str, n: f64) {
    let labels = [("result", result)];
    let within = Duration::from_secs(60);
    proxy
        .wait_sample_within("wasmesh_control_prefetches_total", &labels, n, within)
        .await;
}

/// A new build pushed under the name of a plugin the proxies run is
/// fetched and compiled by them while control validates it, before any
/// apply names it: nothing they serve changes, and the apply that names it
/// compiles nothing. A push control refuses is never served.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_is_compiled_by_the_proxies_running_its_plugin_before_the_apply() {
    let data = tempfile::tempdir().unwrap();
    let control = Control::start(&data.path().join("control")).await;
    let up = Upstream::echo("reviews").await;
    push_tagger(&control, 1);
    control.apply(&tagged(&up, 1));
    let cache = data.path().join("cache");
    let cache = cache.to_str().unwrap();
    let proxy = Proxy::start_control(
        &control.url(),
        "frontend",
        "v1",
        &["--compile-cache", cache],
    )
    .await;
    control.wait_rollout();
    let applied = control.proxies()[0]["applied"].clone();

    let v2 = data.path().join("tagger-2.wasm");
    std::fs::write(&v2, rebuilt(wasmesh_artifacts::ADD_HEADER, "2")).unwrap();
    let (code, out, err) = control.cli(&[
        "push",
        v2.to_str().unwrap(),
        "--name",
        "tagger",
        "--version",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    let sha = out.split_whitespace().nth(1).unwrap().to_string();
    wait_prefetches(&proxy, "compiled", 1.0).await;
    // Compiled, not applied: the proxy serves and reports what it did.
    assert_eq!(tag_through(&proxy).await.json()["headers"]["x-v"], "1");
    assert_eq!(control.proxies()[0]["applied"], applied);

    control.apply(&tagged(&up, 2));
    control.wait_rollout();
    assert_eq!(tag_through(&proxy).await.json()["headers"]["x-v"], "2");
    let log = proxy.log_text();
    assert!(
        log.contains(&format!(
            "prefetched a pushed component plugin=tagger@2 sha256={sha}"
        )),
        "{log}"
    );
    assert_eq!(
        log.matches(&format!("sha256=\"{}\" ms=", &sha[..12]))
            .count(),
        1,
        "one compile of tagger@2, the prefetch's:\n{log}"
    );

    // A build control refuses (the wrong contract version): the proxy's
    // head start fails or is wasted, and nothing it serves changes.
    let (code, _, err) = control.cli(&[
        "push",
        wasmesh_artifacts::WRONG_VERSION,
        "--name",
        "tagger",
        "--version",
        "3",
    ]);
    assert_eq!(code, 2, "{err}");
    wait_prefetches(&proxy, "failed", 1.0).await;
    assert_eq!(tag_through(&proxy).await.json()["headers"]["x-v"], "2");
    let row = &control.proxies()[0];
    assert_eq!(row["state"], "ACK", "{row}");
    assert_eq!(row["applied"], row["latest"], "{row}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_its_reason_and_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let control = Control::start(&data.path().join("control")).await;
    let up = Upstream::echo("reviews").await;
    push_tagger(&control, 1);
    control.apply(&tagged(&up, 1));
    let proxy = Proxy::start_control(&control.url(), "frontend", "v1", &[]).await;
    control.wait_rollout();
    let serving = proxy.config().await["source"].clone();
    let files = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let p = files.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    };
    let push = |path: &str, name: &str, version: &str| {
        control.cli(&["push", path, "--name", name, "--version", version])
    };
    // Components that are not plugins this mesh runs: exit 2, the reason.
    let garbage = file("garbage.wasm", b"not wasm at all");
    let core = file("core.wasm", b"\0asm\x01\0\0\0");
    let big = file("big.wasm", &vec![0u8; 17 << 20]);
    for (path, why) in [
        (garbage.as_str(), "not a valid WebAssembly component"),
        (core.as_str(), "not a valid WebAssembly component"),
        (
            wasmesh_artifacts::WRONG_VERSION,
            "not a wasmesh plugin this proxy can run",
        ),
        (big.as_str(), "over the 16777216-byte limit"),
    ] {
        let (code, out, err) = push(path, "bad", "1");
        assert_eq!(code, 2, "{path}: {out}{err}");
        assert!(err.contains(why), "{path}: {err}");
    }
    // A plugin whose configure traps when its config says so.
    let (code, _, err) = push(wasmesh_artifacts::PROBE, "probe", "1");
    assert_eq!(code, 0, "{err}");
    // A pushed version is immutable.
    let (code, _, err) = push(wasmesh_artifacts::DENY_PATH, "tagger", "1");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already pushed with other bytes"), "{err}");
    // Documents refused, with the field path.
    let refused = |yaml: &str, why: &[&str]| {
        let (code, out, err) = control.cli_stdin(&["apply", "-f", "-"], yaml);
        assert_eq!(code, 2, "{yaml}\n{out}{err}");
        for w in why {
            assert!(err.contains(w), "expected {w:?} in: {err}");
        }
    };
    refused(
        "services:\n  reviews:\n    bogus: 1\n",
        &[
            "(stdin): document 1: services.reviews",
            "unknown field `bogus`",
        ],
    );
    refused(
        "services:\n  reviews:\n    plugins: [{ source: tagger@9 }]\n",
        &[
            "services.reviews.plugins[0].source",
            "no plugin tagger@9 has been pushed",
        ],
    );
    refused(
        "services:\n  reviews:\n    plugins: [{ source: ./local.wasm }]\n",
        &["services.reviews.plugins[0].source", "NAME@VERSION"],
    );
    refused(
        "services:\n  reviews:\n    plugins:\n      - source: builtin:router\n        config: { http: [{ route: [{ destination: { subset: v1 }, weight: lots }] }] }\n",
        &[
            "services.reviews.plugins[0].config",
            "the plugin builtin:router refused its configuration",
            "config.http[0].route[0].weight",
        ],
    );
    refused(
        "services:\n  reviews:\n    plugins: [{ source: tagger@1, match: [{ uri: { prefix: /a, exact: /b } }] }]\n",
        &[
            "services.reviews.plugins[0].match[0].uri",
            "give one of exact, prefix, regex",
        ],
    );
    refused(
        "services:\n  reviews:\n    plugins: [{ source: tagger@1 }, { source: tagger@1 }]\n",
        &["services.reviews.plugins[1].name", "already in this chain"],
    );
    refused(
        "services:\n  reviews:\n    plugins: [{ source: probe@1, config: { mode: trap-in-configure } }]\n",
        &["services.reviews.plugins[0].config", "probe@1", "trapped"],
    );
    refused(
        "services:\n  a: {}\n---\nservices:\n  a: {}\n",
        &["document 2: services.a", "already in (stdin): document 1"],
    );
    // A plugin in use cannot be deleted; an unknown one is not found.
    let (code, _, err) = control.cli(&["delete", "plugin", "tagger@1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("used by service(s) reviews"), "{err}");
    // Nothing that serves changed.
    let (_, out, _) = control.cli(&["get", "services", "-o", "json"]);
    let services: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(services.as_array().unwrap().len(), 1, "{services}");
    assert_eq!(services[0]["revision"], 1);
    assert_eq!(proxy.config().await["source"], serving);
    assert_eq!(tag_through(&proxy).await.json()["headers"]["x-v"], "1");
    // Without the admin credential, a change is refused.
    let (code, _, err) = cli_with(
        &control.url(),
        None,
        &["delete", "service", "reviews"],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("admin credential"), "{err}");
}

/// Garbage on the gRPC port, and a push that stalls mid-stream, cost
/// control nothing but that connection.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_a_stalled_push_cost_control_nothing_else() {
    use tokio::io::AsyncWriteExt;
    let data = tempfile::tempdir().unwrap();
    let control = Control::start(&data.path().join("control")).await;
    let mut garbage = tokio::net::TcpStream::connect(control.listen)
        .await
        .unwrap();
    let _ = garbage.write_all(&[0xffu8; 4096]).await;
    // A push that sends its header and a chunk, then nothing.
    let token = std::fs::read_to_string(control.data.join("admin.token")).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(control.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut registry = wasmesh_api::proto::registry_client::RegistryClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(wasmesh_api::proto::PushRequest {
        part: Some(wasmesh_api::proto::push_request::Part::Header(
            wasmesh_api::proto::PushHeader {
                name: "slow".into(),
                version: "1".into(),
                size: 10_000,
            },
        )),
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().unwrap(),
    );
    let stalled = tokio::spawn(async move { registry.push(req).await });
    // Meanwhile control serves everyone else.
    push_tagger(&control, 1);
    let (code, out, _) = control.cli(&["get", "plugins", "-o", "json"]);
    assert_eq!(code, 0);
    assert!(out.contains("tagger"), "{out}");
    assert!(!stalled.is_finished());
    drop(tx);
    let r = stalled.await.unwrap();
    assert!(r.is_err(), "an incomplete push was accepted: {r:?}");
}

/// A proxy that cannot run what control sends (a plugin needing more
/// memory than this proxy allows) NACKs it: `status` shows the reason, that
/// proxy keeps its snapshot, the others move on.
#[tokio::test(flavor = "multi_thread")]
async fn a_nack_shows_in_status_and_that_proxy_keeps_its_snapshot() {
    let data = tempfile::tempdir().unwrap();
    let control = Control::start(&data.path().join("control")).await;
    let up = Upstream::echo("reviews").await;
    push_tagger(&control, 1);
    control.apply(&tagged(&up, 1));
    let roomy = Proxy::start_control(&control.url(), "frontend", "v1", &[]).await;
    let tight =
        Proxy::start_control(&control.url(), "frontend", "v1", &["--memory-limit", "2Mi"]).await;
    control.wait_rollout();
    let tight_source = tight.config().await["source"].clone();
    // A plugin holding 4 MiB from its configure on: over 2Mi, within the
    // default 16Mi control judges it under.
    let (code, _, err) = control.cli(&[
        "push",
        wasmesh_artifacts::PROBE,
        "--name",
        "big",
        "--version",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    control.apply(&format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n    plugins:\n      - source: tagger@1\n        config: {{ request: {{ x-v: \"2\" }} }}\n      - source: big@1\n        config: {{ mode: none, reserve_kib: 4096 }}\n",
        up.addr
    ));
    let (code, out, err) = control.cli(&["status", "--wait", "--timeout", "60s"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("refused the latest version"), "{err}");
    assert!(err.contains("runtime.memory-limit"), "{err}");
    // `status --wait` stops at the first NACK; the other proxy may still be
    // applying the new version (compiling the plugin): wait for it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = control.proxies();
        if rows.iter().all(|r| r["state"] != "pending") || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let states: Vec<&str> = rows.iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(
        {
            let mut s = states.clone();
            s.sort();
            s
        },
        ["ACK", "NACK"],
        "{rows:?}"
    );
    assert_eq!(tag_through(&roomy).await.json()["headers"]["x-v"], "2");
    assert_eq!(tag_through(&tight).await.json()["headers"]["x-v"], "1");
    assert_eq!(tight.config().await["source"], tight_source);
}

/// `kill -9` of control under load costs no request; restarted on the same
/// data directory, it has every acknowledged push and apply, and the
/// proxies reconnect. A proxy restarted while control is down serves its
/// last ACKed snapshot from the compile cache.
#[tokio::test(flavor = "multi_thread")]
async fn control_killed_under_load_and_restarted_loses_nothing() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("control");
    let mut control = Control::start(&dir).await;
    let up = Upstream::echo("reviews").await;
    push_tagger(&control, 1);
    control.apply(&tagged(&up, 1));
    let cache = data.path().join("cache");
    let cache_arg = cache.display().to_string();
    let steady = Proxy::start_control(&control.url(), "frontend", "v1", &[]).await;
    let cached = Proxy::start_control(
        &control.url(),
        "frontend",
        "v1",
        &["--compile-cache", &cache_arg],
    )
    .await;
    control.wait_rollout();
    let load = Load::start(&[steady.listen], "reviews", 1);
    let (listen_addr, admin_addr) = (control.listen, control.admin);
    control.kill();
    // Control is down: the proxy restarted now serves from its cache.
    drop(cached);
    let cached = Proxy::start_control(
        &format!("http://{listen_addr}"),
        "frontend",
        "v1",
        &["--compile-cache", &cache_arg],
    )
    .await;
    let r = tag_through(&cached).await;
    assert_eq!(
        (r.status, r.json()["headers"]["x-v"].as_str()),
        (200, Some("1"))
    );
    assert!(
        cached.config().await["source"]
            .as_str()
            .unwrap()
            .contains("from the compile cache"),
        "{}",
        cached.log_text()
    );
    let control = Control::start_on(&dir, listen_addr, admin_addr).await;
    control.wait_proxies(2).await;
    control.wait_rollout();
    let (ok, failed) = load.finish().await;
    assert!(
        failed.is_empty() && ok > 0,
        "{ok} ok, {} failed: {failed:?}",
        failed.len()
    );
    let (_, out, _) = control.cli(&["get", "plugins", "-o", "json"]);
    assert!(out.contains("\"tagger\""), "{out}");
    let (_, out, _) = control.cli(&["get", "services", "-o", "json"]);
    assert!(out.contains("\"reviews\""), "{out}");
    // Both proxies still serve version 1 and take the next one.
    push_tagger(&control, 2);
    control.apply(&tagged(&up, 2));
    control.wait_rollout();
    for p in [&steady, &cached] {
        assert_eq!(tag_through(p).await.json()["headers"]["x-v"], "2");
    }
}

/// The store survives `kill -9` at any point: control is killed at random
/// moments during a stream of applies, 20 times; after each restart every
/// apply that was acknowledged is there, whole.
#[tokio::test(flavor = "multi_thread")]
async fn every_acknowledged_apply_survives_kill_9_at_random_points() {
    use wasmesh_api::proto;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("control");
    let mut control = Control::start(&dir).await;
    let (listen, admin) = (control.listen, control.admin);
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    let token: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", token.trim()).parse().unwrap();
    let mut acknowledged: Vec<u32> = Vec::new();
    let mut n = 0u32;
    for round in 0..20 {
        let channel = tonic::transport::Endpoint::from_shared(control.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut config = proto::config_client::ConfigClient::new(channel);
        // Applies as fast as they are acknowledged, until control dies.
        let kill_after = Duration::from_millis(fastrand::u64(20..400));
        let started = Instant::now();
        let mut acked_now = Vec::new();
        while started.elapsed() < kill_after || acked_now.is_empty() {
            n += 1;
            // Each apply writes two services whose specs must agree: a
            // torn write would show one without the other.
            let yaml = format!(
                "services:\n  s{n}:\n    hosts: [\"n{n}.a\"]\n  t{n}:\n    hosts: [\"n{n}.b\"]\n"
            );
            let mut req = tonic::Request::new(proto::ApplyRequest {
                sources: vec![proto::Documents {
                    origin: format!("round {round}"),
                    yaml,
                }],
            });
            req.metadata_mut().insert("authorization", token.clone());
            if config.apply(req).await.is_ok() {
                acked_now.push(n);
            }
        }
        // Kill it with applies in flight.
        let mut req = tonic::Request::new(proto::ApplyRequest {
            sources: vec![proto::Documents {
                origin: "in flight".into(),
                yaml: format!("services:\n  inflight{round}: {{}}\n"),
            }],
        });
        req.metadata_mut().insert("authorization", token.clone());
        let inflight = tokio::spawn(async move { config.apply(req).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..5))).await;
        control.kill();
        let inflight_acked = inflight.await.unwrap();
        acknowledged.extend(acked_now);
        control = Control::start_on(&dir, listen, admin).await;
        let (code, out, err) = control.cli(&["get", "services", "-o", "json"]);
        assert_eq!(code, 0, "{err}");
        let services: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        let names: std::collections::HashSet<String> = services
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        for a in &acknowledged {
            assert!(
                names.contains(&format!("s{a}")) && names.contains(&format!("t{a}")),
                "round {round}: acknowledged apply {a} lost"
            );
        }
        if inflight_acked {
            assert!(names.contains(&format!("inflight{round}")));
        }
        // Nothing torn: each s/t pair is there together, with its hosts.
        for s in &services {
            let name = s["name"].as_str().unwrap();
            if let Some(k) = name.strip_prefix('s') {
                assert!(
                    names.contains(&format!("t{k}")),
                    "round {round}: s{k} without t{k}"
                );
                assert_eq!(s["spec"]["hosts"][0], format!("n{k}.a"));
            }
        }
    }
    assert!(acknowledged.len() >= 20, "{}", acknowledged.len());
}

/// Control refuses a listener beyond loopback unless told `--insecure`,
/// and writes its admin token readable by its user alone.
#[tokio::test(flavor = "multi_thread")]
async fn control_guards_its_listener_and_its_token() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(WASMESH)
        .args(["control", "--listen", &format!("0.0.0.0:{}", free_port())])
        .args([
            "--admin",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
        ])
        .arg(data.path().join("c"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--insecure"),
        "{err}"
    );
    let control = Control::start(&data.path().join("ok")).await;
    let mode = std::fs::metadata(control.data.join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // gRPC health answers SERVING for the discovery service.
    let channel = tonic::transport::Endpoint::from_shared(control.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "wasmesh.control.v1.Discovery".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let m = get(&format!("http://{}/metrics", control.admin))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&m.body).contains("wasmesh_control_connected_proxies"));
}
