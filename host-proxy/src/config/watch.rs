//! `--watch`: reload when the mesh file or a component it references
//! changes. notify-debouncer-mini turns an editor's or a build's series of
//! writes into one event per file, 150 ms after the last write; only content
//! changes count (reading a file, as a reload does, is not one), and only to
//! the files the serving snapshot names. A reload that lands on a half-written
//! file is refused, and the next event retries.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventHandler, RecommendedWatcher, RecursiveMode, Watcher, WatcherKind};
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer_opt};

use super::Live;

/// Quiet time after the last change before reloading.
const DEBOUNCE: Duration = Duration::from_millis(150);

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The platform's watcher, passing on changes only: opening or reading a
/// file (as every reload does) is not a change, nor is the access-time
/// update that a read after a write makes (a metadata change): passing it
/// on would reload a second time after every change.
struct ChangesOnly(RecommendedWatcher);

fn is_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::ModifyKind;
    !matches!(
        kind,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_))
    )
}

impl Watcher for ChangesOnly {
    fn new<F: EventHandler>(mut handler: F, config: notify::Config) -> notify::Result<Self> {
        RecommendedWatcher::new(
            move |ev: notify::Result<notify::Event>| {
                if !matches!(&ev, Ok(e) if !is_change(&e.kind)) {
                    handler.handle_event(ev);
                }
            },
            config,
        )
        .map(Self)
    }
    fn watch(&mut self, path: &Path, mode: RecursiveMode) -> notify::Result<()> {
        self.0.watch(path, mode)
    }
    fn unwatch(&mut self, path: &Path) -> notify::Result<()> {
        self.0.unwatch(path)
    }
    fn kind() -> WatcherKind {
        RecommendedWatcher::kind()
    }
}

/// Start watching; runs for the life of the process.
pub fn spawn(live: Arc<Live>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let config = notify_debouncer_mini::Config::default().with_timeout(DEBOUNCE);
    let debouncer =
        new_debouncer_opt::<_, ChangesOnly>(config, move |r: DebounceEventResult| match r {
            Ok(events) => {
                let _ = tx.send(events.into_iter().map(|e| e.path).collect());
            }
            Err(e) => tracing::warn!("watching files: {e}"),
        });
    let mut debouncer = match debouncer {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("cannot watch files, --watch is off: {e}");
            return;
        }
    };
    // Watches are in place, and the snapshot's files stamped, before this
    // returns (and so before the proxy reports ready): a change made right
    // after `/ready` answers is seen.
    let mut dirs = HashSet::new();
    let mut files = watch_files(&live, &mut debouncer, &mut dirs);
    let mut built = stamp(&files);
    tokio::spawn(async move {
        while let Some(paths) = rx.recv().await {
            if !paths.iter().any(|p| files.contains(&absolute(p))) {
                continue;
            }
            // The debouncer may report one change in two batches: reload
            // only when a watched file differs from what the serving
            // snapshot was built from.
            let now = stamp(&files);
            if now == built {
                continue;
            }
            tracing::debug!(?paths, "watched files changed");
            let l = live.clone();
            let _ = tokio::task::spawn_blocking(move || l.reload()).await;
            files = watch_files(&live, &mut debouncer, &mut dirs);
            built = now;
        }
    });
}

/// What identifies each file's content on disk: its inode (a file renamed
/// over is another), size and modification time; `None` for a file that is
/// not there.
type Stamp = Vec<(PathBuf, Option<(u64, u64, i64, i64)>)>;

fn stamp(files: &HashSet<PathBuf>) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let mut s: Stamp = files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok();
            (
                f.clone(),
                m.map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec())),
            )
        })
        .collect();
    s.sort();
    s
}

/// Watch the directories of the files the serving snapshot names (a
/// directory, so that a file renamed over is still seen); returns those
/// files.
fn watch_files(
    live: &Live,
    debouncer: &mut Debouncer<ChangesOnly>,
    dirs: &mut HashSet<PathBuf>,
) -> HashSet<PathBuf> {
    let mut files = HashSet::new();
    for f in &live.load().watched {
        let f = absolute(f);
        if let Some(d) = f.parent()
            && dirs.insert(d.to_path_buf())
            && let Err(e) = debouncer.watcher().watch(d, RecursiveMode::NonRecursive)
        {
            tracing::warn!(dir = %d.display(), "cannot watch: {e}");
        }
        files.insert(f);
    }
    files
}
