//! The fixed-rate load generator of the side-by-side benchmark
//! (`benches/compare`): HTTP/1.1 keep-alive over N connections, latency
//! measured from each request's *scheduled* start, so coordinated omission
//! does not hide a stall (a request that waited for a busy connection counts
//! the wait).
//!
//! ```text
//! bench-load --rate 1000 --seconds 8 --connections 32 -H 'Host: reviews' http://127.0.0.1:19104/reviews/1
//! bench-load --requests 2000 --connections 4 http://127.0.0.1:19104/reviews/1
//! bench-load --rate 1000 --seconds 48 --slice-ms 1000 http://127.0.0.1:19100/r http://127.0.0.1:19101/r
//! ```
//!
//! With more than one URL (needs `--rate`), the schedule is cut into slices
//! of `--slice-ms` and each slice's requests all go to one URL, the URLs
//! taking turns (in an order shuffled every round), each over its own
//! connections, opened and used once before the schedule starts. Each URL
//! sees the whole rate during its slices, and whatever the machine does
//! over the run falls on all of them alike: the way to compare the latency
//! of several arms on a machine whose speed drifts. The output then has one
//! object per URL under `targets`.
//!
//! With `--rate`, a pacing thread schedules one request every 1/rate seconds
//! (it sleeps with `nanosleep`, not tokio's 1 ms timer wheel) and the
//! connections take them in turn. With `--requests`, the connections send
//! back to back until that many have completed (a closed loop, for counting
//! instructions). It prints one JSON object: counts, status codes, errors and
//! the p50/p90/p95/p99/p99.9 latency in microseconds. Requests still in
//! flight when the run ends get two seconds to finish; any that do not are
//! errors.
//!
//! With `BENCH_LOAD_DUMP=FILE` in its environment it also writes every
//! answered request to FILE, one a line: the target's index, its scheduled
//! start in ns on CLOCK_MONOTONIC, its latency in ns (benches/mtls/tail
//! lays them on a `perf sched` recording of the same run).
//!
//! Written for this harness instead of installing oha: building oha from
//! crates.io took about ten CPU-minutes, most of what put a clean-clone run
//! of the harness over its 25-minute limit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::sync::{Barrier, mpsc};

#[derive(Parser)]
#[command(
    name = "bench-load",
    about = "Fixed-rate HTTP/1.1 load with coordinated-omission correction"
)]
struct Args {
    /// Requests per second, scheduled at even intervals (open loop).
    #[arg(
        long,
        conflicts_with = "requests",
        required_unless_present = "requests"
    )]
    rate: Option<u64>,
    /// Length of a `--rate` run.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Send this many requests back to back instead (closed loop).
    #[arg(long)]
    requests: Option<u64>,
    /// Keep-alive connections.
    #[arg(long, short = 'c', default_value_t = 32)]
    connections: usize,
    /// A request header, `Name: value`; repeatable.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// With several URLs: how long each URL's turn lasts.
    #[arg(long, default_value_t = 1000)]
    slice_ms: u64,
    /// `http://host:port/path`; several take turns (see above).
    #[arg(required = true)]
    urls: Vec<Uri>,
}

/// What one run saw, shared by the connections.
#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    /// With `BENCH_LOAD_DUMP`: each answered request's scheduled start and
    /// latency, for lining slow requests up with a `perf sched` recording.
    requests: Vec<(Instant, u64)>,
    keep_requests: bool,
    status: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
}

fn main() {
    let args = Args::parse();
    if args.urls.len() > 1 && args.rate.is_none() {
        fail("several URLs take turns in a --rate run only");
    }
    let mut headers = Vec::new();
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            fail(&format!("header {h:?}: expected `Name: value`"))
        };
        let name = hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
            .unwrap_or_else(|e| fail(&format!("header {h:?}: {e}")));
        let value = hyper::header::HeaderValue::from_str(value.trim())
            .unwrap_or_else(|e| fail(&format!("header {h:?}: {e}")));
        headers.push((name, value));
    }
    let targets: Vec<Arc<Target>> = args
        .urls
        .iter()
        .map(|url| Arc::new(target(url, &headers)))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("tokio runtime: {e}")));
    let dump = std::env::var_os("BENCH_LOAD_DUMP");
    let tallies: Vec<_> = targets
        .iter()
        .map(|_| {
            Arc::new(Mutex::new(Tally {
                keep_requests: dump.is_some(),
                ..Tally::default()
            }))
        })
        .collect();
    let started = Instant::now();
    runtime.block_on(run(&args, &targets, &tallies));
    let elapsed = started.elapsed();
    if let Some(path) = dump {
        write_dump(&path, &tallies).unwrap_or_else(|e| fail(&format!("BENCH_LOAD_DUMP: {e}")));
    }
    let mut summaries: Vec<_> = tallies
        .iter()
        .map(|t| summary(std::mem::take(&mut *t.lock().expect("tally lock")), elapsed))
        .collect();
    let out = if summaries.len() == 1 {
        summaries.remove(0)
    } else {
        serde_json::json!({
            "seconds": elapsed.as_secs_f64(),
            "targets": args.urls.iter().map(ToString::to_string).zip(summaries).collect::<serde_json::Map<_, _>>(),
        })
    };
    println!("{out}");
}

fn target(
    url: &Uri,
    headers: &[(hyper::header::HeaderName, hyper::header::HeaderValue)],
) -> Target {
    let authority = match url.authority() {
        Some(a) if url.scheme_str() == Some("http") => a.as_str().to_string(),
        _ => fail(&format!("{url}: only http://host:port/path URLs")),
    };
    let mut headers = headers.to_vec();
    if !headers.iter().any(|(n, _)| n == hyper::header::HOST) {
        let host = hyper::header::HeaderValue::from_str(&authority)
            .expect("an authority is a valid header");
        headers.push((hyper::header::HOST, host));
    }
    let path = url
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    Target {
        authority,
        path,
        headers,
    }
}

struct Target {
    authority: String,
    path: String,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
}

async fn run(args: &Args, targets: &[Arc<Target>], tallies: &[Arc<Mutex<Tally>>]) {
    let turns = targets.len() > 1;
    let paced = args.rate.is_some();
    let connections = args.connections.max(1);
    let remaining = Arc::new(AtomicU64::new(args.requests.unwrap_or(u64::MAX)));
    // Taking turns: every connection is opened and used once before the
    // schedule starts, so no URL's first slice pays for its connects.
    let warmed = turns.then(|| Arc::new(Barrier::new(targets.len() * connections + 1)));
    let mut senders = Vec::new();
    let mut queues = Vec::new();
    let mut workers = Vec::new();
    for (i, (target, tally)) in targets.iter().zip(tallies).enumerate() {
        let (tx, rx) = mpsc::unbounded_channel::<Instant>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        senders.push(tx);
        queues.push(rx.clone());
        for _ in 0..connections {
            let (target, tally, rx, remaining, warmed) = (
                target.clone(),
                tally.clone(),
                rx.clone(),
                remaining.clone(),
                warmed.clone(),
            );
            let worker = tokio::spawn(async move {
                let mut sender = None;
                if let Some(warmed) = warmed {
                    if let Err(e) = one_request(&target, &mut sender).await {
                        *tally
                            .lock()
                            .expect("tally lock")
                            .errors
                            .entry(format!("warm-up: {e}"))
                            .or_default() += 1;
                        sender = None;
                    }
                    warmed.wait().await;
                }
                let schedule = paced.then_some(&*rx);
                connection(&target, &tally, schedule, &remaining, sender).await;
            });
            workers.push((i, worker));
        }
    }
    let Some(rate) = args.rate else {
        drop(senders);
        for (_, w) in workers {
            let _ = w.await;
        }
        return;
    };
    if let Some(warmed) = warmed {
        warmed.wait().await;
    }
    // The pacer: a timerfd on this thread's epoll, so a tick wakes the
    // runtime directly, with no tokio 1 ms timer rounding and no second
    // thread to switch to.
    let ticks = rate.saturating_mul(args.seconds);
    let mut turns = Turns::new(Duration::from_millis(args.slice_ms.max(1)), targets.len());
    let mut timer = Ticker::new(rate).unwrap_or_else(|e| fail(&format!("timerfd: {e}")));
    let mut sent = 0;
    while sent < ticks {
        for at in timer
            .next()
            .await
            .unwrap_or_else(|e| fail(&format!("timerfd: {e}")))
        {
            let turn = turns.at(at.duration_since(timer.start));
            if sent < ticks && senders[turn].send(at).is_ok() {
                sent += 1;
            }
        }
    }
    drop(senders);
    // The schedule is over: what is still in flight gets 2 s.
    let grace = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(grace);
    for (_, w) in &mut workers {
        tokio::select! {
            _ = &mut grace => break,
            _ = w => {}
        }
    }
    for (i, (queue, tally)) in queues.iter().zip(tallies).enumerate() {
        let left = queue.lock().await.len() as u64;
        let stuck = workers
            .iter()
            .filter(|(t, w)| *t == i && !w.is_finished())
            .count() as u64;
        let mut t = tally.lock().expect("tally lock");
        if left > 0 {
            *t.errors
                .entry("not sent before the end (overloaded)".into())
                .or_default() += left;
        }
        if stuck > 0 {
            *t.errors
                .entry("no response within 2 s of the end".into())
                .or_default() += stuck;
        }
    }
}

/// Whose turn it is: slices of `slice` go round the `n` targets, each
/// round in its own shuffled order (so no target always follows the same
/// one: a proxy that keeps a timer running for a while after its turn would
/// always warm the same successor). The order is made once a round.
struct Turns {
    slice: Duration,
    round: Option<u64>,
    order: Vec<usize>,
}

impl Turns {
    fn new(slice: Duration, n: usize) -> Self {
        Turns {
            slice,
            round: None,
            order: (0..n.max(1)).collect(),
        }
    }

    /// The target whose turn it is `since` the schedule started.
    fn at(&mut self, since: Duration) -> usize {
        let n = self.order.len() as u128;
        let k = since.as_nanos() / self.slice.as_nanos().max(1);
        let (round, pos) = ((k / n) as u64, (k % n) as usize);
        if self.round != Some(round) {
            self.round = Some(round);
            self.order.sort_unstable();
            // xorshift64*, seeded by the round: the same order every run.
            let mut x = round.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for i in (1..self.order.len()).rev() {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                let j = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % (i + 1);
                self.order.swap(i, j);
            }
        }
        self.order[pos]
    }
}

/// One keep-alive connection: takes scheduled requests (or, unpaced, the
/// next of `remaining`) until there are none, reconnecting after an error.
async fn connection(
    target: &Target,
    tally: &Mutex<Tally>,
    schedule: Option<&tokio::sync::Mutex<mpsc::UnboundedReceiver<Instant>>>,
    remaining: &AtomicU64,
    mut sender: Option<http1::SendRequest<Empty<Bytes>>>,
) {
    loop {
        let scheduled = match schedule {
            Some(rx) => match rx.lock().await.recv().await {
                Some(at) => at,
                None => return,
            },
            None => {
                if remaining
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_err()
                {
                    return;
                }
                Instant::now()
            }
        };
        let outcome = match one_request(target, &mut sender).await {
            Ok(status) => Ok(status),
            Err(e) => {
                sender = None;
                Err(e)
            }
        };
        let latency = scheduled.elapsed().as_nanos() as u64;
        let mut t = tally.lock().expect("tally lock");
        match outcome {
            Ok(status) => {
                *t.status.entry(status).or_default() += 1;
                t.latencies_ns.push(latency);
                if t.keep_requests {
                    t.requests.push((scheduled, latency));
                }
            }
            Err(e) => *t.errors.entry(e).or_default() += 1,
        }
    }
}

async fn one_request(
    target: &Target,
    sender: &mut Option<http1::SendRequest<Empty<Bytes>>>,
) -> Result<u16, String> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        let stream = tokio::net::TcpStream::connect(&target.authority)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (s, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        *sender = Some(s);
    }
    let s = sender.as_mut().expect("connected above");
    s.ready().await.map_err(|e| format!("connection: {e}"))?;
    let mut req = Request::get(target.path.as_str());
    for (n, v) in &target.headers {
        req = req.header(n, v);
    }
    let req = req
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = s
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?;
    Ok(status)
}

/// Writes `target scheduled_ns latency_ns` a line, `scheduled_ns` on
/// CLOCK_MONOTONIC (what `perf record -k CLOCK_MONOTONIC` stamps events
/// with), so a slow request can be found in a recording of the same run.
#[allow(unsafe_code)]
fn write_dump(path: &std::ffi::OsStr, tallies: &[Arc<Mutex<Tally>>]) -> std::io::Result<()> {
    use std::io::Write;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let now = Instant::now();
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono_now = ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (i, tally) in tallies.iter().enumerate() {
        for (at, latency) in &tally.lock().expect("tally lock").requests {
            let mono = mono_now - now.duration_since(*at).as_nanos();
            writeln!(out, "{i} {mono} {latency}")?;
        }
    }
    out.flush()
}

fn summary(mut t: Tally, elapsed: Duration) -> serde_json::Value {
    t.latencies_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        if t.latencies_ns.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * t.latencies_ns.len() as f64).ceil() as usize;
        t.latencies_ns[i.clamp(1, t.latencies_ns.len()) - 1] as f64 / 1000.0
    };
    let completed: u64 = t.status.values().sum();
    serde_json::json!({
        "completed": completed,
        "seconds": elapsed.as_secs_f64(),
        "status": t.status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "errors": t.errors,
        "p50_us": pct(50.0),
        "p90_us": pct(90.0),
        "p95_us": pct(95.0),
        "p99_us": pct(99.0),
        "p99.9_us": pct(99.9),
        "max_us": pct(100.0),
    })
}

/// A periodic Linux timerfd (one tick every 1/rate s) read through tokio:
/// each wake-up yields the scheduled instants of the ticks that have passed.
struct Ticker {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    start: Instant,
    period: Duration,
    ticks: u64,
}

#[allow(unsafe_code)]
impl Ticker {
    fn new(rate: u64) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
        // SAFETY: plain syscalls on a descriptor this function owns; the
        // itimerspec is fully initialised.
        let fd = unsafe {
            let fd = libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let every = libc::timespec {
                tv_sec: period.as_secs() as libc::time_t,
                tv_nsec: period.subsec_nanos() as libc::c_long,
            };
            let spec = libc::itimerspec {
                it_interval: every,
                it_value: every,
            };
            if libc::timerfd_settime(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
                &spec,
                std::ptr::null_mut(),
            ) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            fd
        };
        // SAFETY: `fd` is an open descriptor the AsyncFd now owns and closes.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(Ticker {
            fd,
            start: Instant::now(),
            period,
            ticks: 0,
        })
    }

    /// Waits for the next tick(s); returns when each was due.
    async fn next(&mut self) -> std::io::Result<Vec<Instant>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into a u64, as timerfd(2) specifies.
            let n = unsafe {
                libc::read(
                    std::os::fd::AsRawFd::as_raw_fd(guard.get_inner()),
                    (&mut count as *mut u64).cast(),
                    8,
                )
            };
            if n == 8 {
                let first = self.ticks + 1;
                self.ticks += count;
                return Ok((first..=self.ticks)
                    .map(|k| self.start + self.period * k as u32)
                    .collect());
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::WouldBlock {
                return Err(err);
            }
            guard.clear_ready();
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("bench-load: {msg}");
    std::process::exit(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_gets_one_slice_a_round_in_an_order_that_varies() {
        let slice = Duration::from_secs(1);
        let mut orders = std::collections::BTreeSet::new();
        let mut follows_5 = std::collections::BTreeSet::new();
        let mut last = None;
        let mut turns = Turns::new(slice, 6);
        for round in 0..12u64 {
            let order: Vec<usize> = (0..6)
                .map(|pos| turns.at(slice * (round * 6 + pos) as u32 + slice / 2))
                .collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2, 3, 4, 5], "round {round}: {order:?}");
            for t in order.iter().copied() {
                if last == Some(5) {
                    follows_5.insert(t);
                }
                last = Some(t);
            }
            orders.insert(order);
        }
        assert!(orders.len() >= 10, "{orders:?}");
        assert!(follows_5.len() >= 4, "target 5 followed by {follows_5:?}");
        assert_eq!(Turns::new(slice, 1).at(slice * 3), 0);
        // Asked again out of order, a round's order is the same.
        let first: Vec<usize> = (0..6).map(|pos| turns.at(slice * pos)).collect();
        let again: Vec<usize> = (0..6)
            .map(|pos| Turns::new(slice, 6).at(slice * pos))
            .collect();
        assert_eq!(first, again);
    }
}
