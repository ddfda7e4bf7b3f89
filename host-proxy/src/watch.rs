//! `--watch`: reload when the mesh file or a component it references changes.
//! Events are debounced (150 ms after the last one) so that an editor's or a
//! build's series of writes makes one reload; a reload that lands on a
//! half-written file is refused and the next event retries.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use crate::Shared;

/// Quiet time after the last change before reloading.
const DEBOUNCE: Duration = Duration::from_millis(150);

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Start watching; runs for the life of the process.
pub fn spawn(shared: Arc<Shared>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = match notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Reading a file (as a reload does) is an access event: only changes count.
        if let Ok(ev) = ev
            && !matches!(ev.kind, notify::EventKind::Access(_))
        {
            for p in ev.paths {
                let _ = tx.send(p);
            }
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!("cannot watch files, --watch is off: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        let mut dirs: HashSet<PathBuf> = HashSet::new();
        let mut files: HashSet<PathBuf> = HashSet::new();
        let rewatch = |watcher: &mut notify::RecommendedWatcher,
                       dirs: &mut HashSet<PathBuf>,
                       files: &mut HashSet<PathBuf>| {
            files.clear();
            for f in &shared.snapshot.load().watched {
                let f = absolute(f);
                if let Some(d) = f.parent()
                    && dirs.insert(d.to_path_buf())
                    && let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive)
                {
                    tracing::warn!(dir = %d.display(), "cannot watch: {e}");
                }
                files.insert(f);
            }
        };
        rewatch(&mut watcher, &mut dirs, &mut files);
        while let Some(p) = rx.recv().await {
            if !files.contains(&absolute(&p)) {
                continue;
            }
            // Debounce: wait until no relevant event came for DEBOUNCE.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let s = shared.clone();
            let _ = tokio::task::spawn_blocking(move || s.reload()).await;
            rewatch(&mut watcher, &mut dirs, &mut files);
        }
    });
}
