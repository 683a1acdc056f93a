//! Manifests from a file or a directory, reloaded when they change on disk
//! (inotify through the `notify` crate, never a timer) or on SIGHUP.
//!
//! The watch is on the directory, not on the file's inode, so editors that
//! save by writing a new file and renaming it over the old one are seen.
//! A change is reported at once, with the events already arrived (an
//! editor's write, chmod, rename): no quiet period holds it back, and a
//! stream of changes can never starve the reloads. Later events of a burst
//! are merged by the run loop while a reload runs (its `Work::queue`).
//!
//! The [`FileLoader`] reads a directory file by file, only the files that
//! changed, and sends what changed in them (see `loader`). It keeps each
//! file's last good objects through what looks like a write in progress: a
//! file that is empty, or one that is gone at a reload (it is kept for that
//! reload, and dropped only if still gone at the next one, which follows
//! [`SETTLE`] later). A file deleted on purpose thus takes its Services with
//! it, one settle period later. A file that is invalid but was written less
//! than [`SETTLE`] ago is taken as written in place and half done: its last
//! good objects are kept, and it is read again [`SETTLE`] later, when an
//! error is reported as such. A single `--config` file that is missing is
//! an error, and its last good configuration keeps serving.

mod loader;

pub use loader::{FileLoader, Loaded};

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config;

/// How long a file that looks mid-write (gone, or invalid and just
/// written) keeps its last good objects before it is read again.
pub const SETTLE: Duration = Duration::from_millis(150);

pub struct FileSource {
    /// Kept alive for as long as the source watches.
    _watcher: RecommendedWatcher,
    changes: mpsc::UnboundedReceiver<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

impl FileSource {
    /// Start watching `path` (a manifest file or a directory of them).
    pub fn watch(path: &Path) -> Result<Self, WatchError> {
        let path = path.to_path_buf();
        let (tx, changes) = mpsc::unbounded_channel();
        let watched = if path.is_dir() { path.clone() } else { parent_dir(&path) };
        let target = path.clone();
        let is_dir = path.is_dir();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            let relevant = event.paths.iter().any(|p| {
                if is_dir { config::is_manifest_name(p) } else { p.file_name() == target.file_name() }
            });
            if relevant {
                let _ = tx.send(());
            }
        })
        .map_err(|source| WatchError::Watch { path: watched.clone(), source })?;
        watcher
            .watch(&watched, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError::Watch { path: watched.clone(), source })?;
        Ok(Self { _watcher: watcher, changes })
    }

    /// Wait for the next change on disk; the events already arrived go
    /// with it. `None` once the watcher is gone. Cancel-safe: the only
    /// await is the channel's `recv`.
    pub async fn changed(&mut self) -> Option<()> {
        self.changes.recv().await?;
        while self.changes.try_recv().is_ok() {}
        Some(())
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
