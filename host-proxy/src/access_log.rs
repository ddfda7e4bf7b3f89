//! The JSON access log (`--access-log FILE`, or `-` for stdout): a line per
//! request, written off the request path by a thread of its own (every
//! 50 ms, and at shutdown: requests never wake it). Requests
//! hand it finished lines through a bounded queue; when the disk (or the
//! pipe) cannot keep up, lines are dropped and counted in
//! `wasmesh_access_log_dropped_total`, never requests delayed.
//!
//! Reads [`crate::metrics`]; [`crate::chain`]'s completion guard writes it.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::metrics::Metrics;

/// Lines waiting to be written at most.
pub const QUEUE: usize = 8192;

/// The access log.
pub struct AccessLog {
    tx: SyncSender<Vec<u8>>,
    metrics: Arc<Metrics>,
    /// Set at shutdown: the writer writes what is queued and stops.
    closing: Arc<AtomicBool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl AccessLog {
    /// Open `target` (a file, appended to, or `-` for stdout) and start the
    /// writer thread.
    pub fn open(target: &str, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Self>> {
        let out: Box<dyn Write + Send> = if target == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(target)
                    .map_err(|e| anyhow::anyhow!("--access-log {target}: {e}"))?,
            )
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let closing = Arc::new(AtomicBool::new(false));
        let stop = closing.clone();
        let writer = std::thread::Builder::new()
            .name("wasmesh-access-log".into())
            .spawn(move || write_lines(&rx, out, &stop))?;
        Ok(Arc::new(Self {
            tx,
            metrics,
            closing,
            writer: Mutex::new(Some(writer)),
        }))
    }

    /// Write what is queued and stop the writer (at shutdown).
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        if let Some(w) = self.writer.lock().unwrap().take() {
            w.thread().unpark();
            let _ = w.join();
        }
    }

    /// Queue one line, or drop and count it when the queue is full.
    pub fn write(&self, line: &Line<'_>) {
        let mut buf = Vec::with_capacity(512);
        if serde_json::to_writer(&mut buf, line).is_err() {
            return;
        }
        buf.push(b'\n');
        match self.tx.try_send(buf) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.access_log_dropped.inc();
            }
        }
    }
}

/// One request's line, borrowed from the request as it ends.
#[derive(Debug, Default, Serialize)]
pub struct Line<'a> {
    /// When it ended (RFC 3339, UTC).
    pub time: String,
    /// `outbound` or `inbound`.
    pub listener: &'static str,
    /// Its method.
    pub method: &'a str,
    /// Its authority (host).
    pub authority: Option<&'a str>,
    /// Its path and query.
    pub path: Option<&'a str>,
    /// `HTTP/1.1`, `HTTP/2`...
    pub protocol: &'static str,
    /// The client's `ip:port`.
    pub client: &'a str,
    /// The client's SPIFFE ID (mesh mTLS).
    pub principal: Option<&'a str>,
    /// Its `x-request-id`.
    pub request_id: Option<&'a str>,
    /// The service it was routed to.
    pub service: Option<&'a str>,
    /// The status sent (0: none).
    pub status: u16,
    /// Response flags (`-`: none).
    pub flags: &'static str,
    /// Until the response's last byte, in milliseconds (µs precision).
    pub duration_ms: f64,
    /// The endpoint tried last.
    pub upstream: Option<&'a str>,
    /// Its subset.
    pub subset: Option<&'a str>,
    /// Upstream attempts.
    pub attempts: u32,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// Each plugin's decision, per hook.
    pub plugins: Decisions<'a>,
    /// The trace, when tracing.
    pub trace_id: Option<String>,
}

/// (plugin, hook, decision) as JSON objects.
#[derive(Debug, Default)]
pub struct Decisions<'a>(pub &'a [(Arc<str>, &'static str, &'static str)]);

impl Serialize for Decisions<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(plugin, hook, decision)| Decided {
            plugin,
            hook,
            decision,
        }))
    }
}

#[derive(Serialize)]
struct Decided<'a> {
    plugin: &'a str,
    hook: &'a str,
    decision: &'a str,
}

/// Now, as RFC 3339 UTC.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// An HTTP version as the log writes it.
pub fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

/// The writer thread: lines as they come, flushed whenever the queue is
/// empty (it sleeps, with no timer, while no request ends).
/// How often the writer wakes to write what was queued. Requests never
/// wake it: a wake-up per line is a context switch per request on the
/// proxy's core (measured: +20 µs of CPU a request at saturation).
const WRITE_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

fn write_lines(rx: &Receiver<Vec<u8>>, out: Box<dyn Write + Send>, closing: &AtomicBool) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    loop {
        std::thread::park_timeout(WRITE_EVERY);
        let last = closing.load(Ordering::SeqCst);
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    if out.write_all(&line).is_err() {
                        return;
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if out.flush().is_err() || last {
            return;
        }
    }
}
