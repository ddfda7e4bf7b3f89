//! `bench-control`: the control plane's benchmarks (benches/control/run
//! drives them).
//!
//! `fanout`: N simulated proxies, each a discovery stream on its own
//! connection, that ACK every snapshot at once; then changes applied one at
//! a time, timing each proxy's ACK from the moment the change was sent.
//! Prints control's RSS per connected proxy and, last, one line
//! `RESULT proxies=N ack_p50_ms=… ack_p99_ms=… all_p50_ms=… all_p99_ms=…
//! rss_per_proxy_kib=…` (`ack_*`: over every proxy's ACK of every change;
//! `all_*`: the time until the last proxy ACKed one change).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use wasmesh_api::proto;

#[derive(Parser)]
#[command(about = "wasmesh control-plane benchmarks")]
enum Bench {
    /// Fan-out to simulated proxies.
    Fanout {
        /// Control's gRPC address, or several replicas' (comma-separated):
        /// changes are applied through the first, proxies spread over all.
        #[arg(long)]
        control: String,
        /// Control's admin token file.
        #[arg(long)]
        token: std::path::PathBuf,
        /// Control's pid (for its RSS), or the replicas' (comma-separated).
        #[arg(long, value_delimiter = ',')]
        pid: Vec<u32>,
        /// Simulated proxies.
        #[arg(long, default_value_t = 1000)]
        proxies: usize,
        /// Changes to time.
        #[arg(long, default_value_t = 20)]
        changes: usize,
    },
}

fn raise_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let l = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        },
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// One simulated proxy: a stream on its own connection; every snapshot it
/// receives is reported (version, when) and ACKed at once.
async fn proxy(
    url: String,
    i: usize,
    seen: mpsc::UnboundedSender<(usize, String, Instant)>,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await?;
    let mut client = proto::discovery_client::DiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(2);
    tx.send(proto::ProxyMessage {
        message: Some(proto::proxy_message::Message::Hello(proto::Hello {
            service: format!("frontend-{}", i % 10),
            subset: "v1".into(),
            instance: format!("sim-{i}"),
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(m) = inbound.next().await {
        let Some(s) = m?.snapshot else { continue };
        let _ = seen.send((i, s.version.clone(), Instant::now()));
        tx.send(proto::ProxyMessage {
            message: Some(proto::proxy_message::Message::Ack(proto::Ack {
                version: s.version,
                error: String::new(),
            })),
        })
        .await?;
    }
    Ok(())
}

async fn fanout(
    urls: String,
    token: std::path::PathBuf,
    pids: Vec<u32>,
    n: usize,
    changes: usize,
) -> anyhow::Result<()> {
    raise_open_files();
    let replicas: Vec<String> = urls.split(',').map(str::to_string).collect();
    let url = replicas[0].clone();
    let rss_kib = |pids: &[u32]| pids.iter().map(|p| rss_kib(*p)).sum::<u64>();
    let token = std::fs::read_to_string(&token).context("reading the token")?;
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim()).parse()?;
    let channel = tonic::transport::Endpoint::from_shared(url.clone())?
        .connect()
        .await?;
    let mut config = proto::config_client::ConfigClient::new(channel);
    let apply = |yaml: String| {
        let mut req = tonic::Request::new(proto::ApplyRequest {
            sources: vec![proto::Documents {
                origin: "bench".into(),
                yaml,
            }],
        });
        req.metadata_mut().insert("authorization", token.clone());
        req
    };
    config
        .apply(apply(
            "services:\n  reviews:\n    hosts: [\"change-0\"]\n".into(),
        ))
        .await?;
    let rss_before = rss_kib(&pids);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t = Instant::now();
    for i in 0..n {
        tokio::spawn(proxy(replicas[i % replicas.len()].clone(), i, tx.clone()));
        if i % 500 == 499 {
            // Let control accept the burst.
            tokio::task::yield_now().await;
        }
    }
    let mut current: Vec<Option<String>> = vec![None; n];
    let mut connected = 0;
    while connected < n {
        let (i, v, _) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .context("proxies did not all connect within 120 s")?
            .context("channel closed")?;
        if current[i].is_none() {
            connected += 1;
        }
        current[i] = Some(v);
    }
    // Settle: connecting proxies' registrations changed nothing (no app
    // addresses), but wait for stragglers' snapshots to drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok((i, v, _)) = rx.try_recv() {
        current[i] = Some(v);
    }
    let rss_after = rss_kib(&pids);
    println!(
        "{n} simulated proxies connected to {} replica(s) in {:?}; control RSS {rss_before} → {rss_after} KiB",
        replicas.len(),
        t.elapsed()
    );
    let mut acks = Vec::new();
    let mut alls = Vec::new();
    for c in 1..=changes {
        let sent = Instant::now();
        config
            .apply(apply(format!(
                "services:\n  reviews:\n    hosts: [\"change-{c}\"]\n"
            )))
            .await?;
        let mut fresh = vec![false; n];
        let mut got = 0;
        let mut last = sent;
        while got < n {
            let (i, v, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .context("a change did not reach every proxy within 60 s")?
                .context("channel closed")?;
            if current[i].as_deref() != Some(v.as_str()) && !fresh[i] {
                fresh[i] = true;
                got += 1;
                acks.push(at.duration_since(sent).as_secs_f64() * 1000.0);
                last = last.max(at);
            }
            current[i] = Some(v);
        }
        alls.push(last.duration_since(sent).as_secs_f64() * 1000.0);
    }
    acks.sort_by(f64::total_cmp);
    alls.sort_by(f64::total_cmp);
    let per_proxy = rss_after.saturating_sub(rss_before) as f64 / n as f64;
    println!(
        "RESULT proxies={n} ack_p50_ms={:.1} ack_p99_ms={:.1} all_p50_ms={:.1} all_p99_ms={:.1} rss_per_proxy_kib={per_proxy:.1}",
        percentile(&acks, 0.5),
        percentile(&acks, 0.99),
        percentile(&alls, 0.5),
        percentile(&alls, 0.99),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match Bench::parse() {
        Bench::Fanout {
            control,
            token,
            pid,
            proxies,
            changes,
        } => rt.block_on(fanout(control, token, pid, proxies, changes)),
    }
}
