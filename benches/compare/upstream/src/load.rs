//! The fixed-rate load generator of the side-by-side benchmark
//! (`benches/compare`): HTTP/1.1 keep-alive over N connections, latency
//! measured from each request's *scheduled* start, so coordinated omission
//! does not hide a stall (a request that waited for a busy connection counts
//! the wait).
//!
//! ```text
//! bench-load --rate 1000 --seconds 8 --connections 32 -H 'Host: reviews' http://127.0.0.1:19104/reviews/1
//! bench-load --requests 2000 --connections 4 http://127.0.0.1:19104/reviews/1
//! ```
//!
//! With `--rate`, a pacing thread schedules one request every 1/rate seconds
//! (it sleeps with `nanosleep`, not tokio's 1 ms timer wheel) and the
//! connections take them in turn. With `--requests`, the connections send
//! back to back until that many have completed (a closed loop, for counting
//! instructions). It prints one JSON object: counts, status codes, errors and
//! the p50/p99/p99.9 latency in microseconds. Requests still in flight when
//! the run ends get two seconds to finish; any that do not are errors.
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
use tokio::sync::mpsc;

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
    /// `http://host:port/path`
    url: Uri,
}

/// What one run saw, shared by the connections.
#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    status: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
}

fn main() {
    let args = Args::parse();
    let authority = match args.url.authority() {
        Some(a) if args.url.scheme_str() == Some("http") => a.as_str().to_string(),
        _ => fail(&format!("{}: only http://host:port/path URLs", args.url)),
    };
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
    if !headers.iter().any(|(n, _)| n == hyper::header::HOST) {
        let host = hyper::header::HeaderValue::from_str(&authority)
            .expect("an authority is a valid header");
        headers.push((hyper::header::HOST, host));
    }
    let path = args
        .url
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let target = Arc::new(Target {
        authority,
        path,
        headers,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("tokio runtime: {e}")));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    runtime.block_on(run(&args, target, tally.clone()));
    let elapsed = started.elapsed();
    let tally = std::mem::take(&mut *tally.lock().expect("tally lock"));
    report(tally, elapsed);
}

struct Target {
    authority: String,
    path: String,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
}

async fn run(args: &Args, target: Arc<Target>, tally: Arc<Mutex<Tally>>) {
    let (tx, rx) = mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let remaining = Arc::new(AtomicU64::new(args.requests.unwrap_or(u64::MAX)));
    let mut workers = Vec::new();
    for _ in 0..args.connections.max(1) {
        let (target, tally, rx, remaining) =
            (target.clone(), tally.clone(), rx.clone(), remaining.clone());
        let paced = args.rate.is_some();
        workers.push(tokio::spawn(async move {
            connection(&target, &tally, paced.then_some(&*rx), &remaining).await
        }));
    }
    if let Some(rate) = args.rate {
        // The pacer: a timerfd on this thread's epoll, so a tick wakes the
        // runtime directly, with no tokio 1 ms timer rounding and no second
        // thread to switch to.
        let ticks = rate.saturating_mul(args.seconds);
        let mut timer = Ticker::new(rate).unwrap_or_else(|e| fail(&format!("timerfd: {e}")));
        let mut sent = 0;
        while sent < ticks {
            for at in timer
                .next()
                .await
                .unwrap_or_else(|e| fail(&format!("timerfd: {e}")))
            {
                if sent < ticks && tx.send(at).is_ok() {
                    sent += 1;
                }
            }
        }
        drop(tx);
        // The schedule is over: what is still in flight gets 2 s.
        let grace = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(grace);
        for w in &mut workers {
            tokio::select! {
                _ = &mut grace => break,
                _ = w => {}
            }
        }
        let left = rx.lock().await.len() as u64;
        let mut t = tally.lock().expect("tally lock");
        if left > 0 {
            *t.errors
                .entry("not sent before the end (overloaded)".into())
                .or_default() += left;
        }
        let stuck = workers.iter().filter(|w| !w.is_finished()).count() as u64;
        if stuck > 0 {
            *t.errors
                .entry("no response within 2 s of the end".into())
                .or_default() += stuck;
        }
    } else {
        drop(tx);
        for w in workers {
            let _ = w.await;
        }
    }
}

/// One keep-alive connection: takes scheduled requests (or, unpaced, the
/// next of `remaining`) until there are none, reconnecting after an error.
async fn connection(
    target: &Target,
    tally: &Mutex<Tally>,
    schedule: Option<&tokio::sync::Mutex<mpsc::UnboundedReceiver<Instant>>>,
    remaining: &AtomicU64,
) {
    let mut sender: Option<http1::SendRequest<Empty<Bytes>>> = None;
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

fn report(mut t: Tally, elapsed: Duration) {
    t.latencies_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        if t.latencies_ns.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * t.latencies_ns.len() as f64).ceil() as usize;
        t.latencies_ns[i.clamp(1, t.latencies_ns.len()) - 1] as f64 / 1000.0
    };
    let completed: u64 = t.status.values().sum();
    let out = serde_json::json!({
        "completed": completed,
        "seconds": elapsed.as_secs_f64(),
        "status": t.status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "errors": t.errors,
        "p50_us": pct(50.0),
        "p99_us": pct(99.0),
        "p99.9_us": pct(99.9),
        "max_us": pct(100.0),
    });
    println!("{out}");
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
