//! The JSON access log (`--access-log FILE`, or `-` for stdout): a line per
//! request, written off the request path by a thread of its own. Requests
//! hand it finished lines through a bounded queue; when the disk (or the
//! pipe) cannot keep up, lines are dropped and counted in
//! `wasmesh_access_log_dropped_total`, never requests delayed.
//!
//! Reads [`crate::metrics`]; [`crate::chain`]'s completion guard writes it.

use std::io::Write;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use crate::metrics::Metrics;

/// Lines waiting to be written at most.
pub const QUEUE: usize = 8192;

/// The access log.
pub struct AccessLog {
    tx: SyncSender<String>,
    metrics: Arc<Metrics>,
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
        std::thread::Builder::new()
            .name("wasmesh-access-log".into())
            .spawn(move || write_lines(&rx, out))?;
        Ok(Arc::new(Self { tx, metrics }))
    }

    /// Queue one line (a JSON object, stamped with the time here), or drop
    /// and count it when the queue is full.
    pub fn write(&self, mut entry: serde_json::Value) {
        if let Some(e) = entry.as_object_mut() {
            let now = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            e.insert("time".into(), now.into());
        }
        let mut line = entry.to_string();
        line.push('\n');
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.access_log_dropped.inc();
            }
        }
    }
}

/// The writer thread: lines as they come, flushed whenever the queue is
/// empty (it sleeps, with no timer, while no request ends).
fn write_lines(rx: &Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(line) = rx.recv() {
        if out.write_all(line.as_bytes()).is_err() {
            return;
        }
        while let Ok(line) = rx.try_recv() {
            if out.write_all(line.as_bytes()).is_err() {
                return;
            }
        }
        let _ = out.flush();
    }
}
