//! Manifests from a file or a directory, reloaded when they change on disk
//! (inotify through the `notify` crate, never a timer) or on SIGHUP.
//!
//! The watch is on the directory, not on the file's inode, so editors that
//! save by writing a new file and renaming it over the old one are seen.
//! Bursts of events (an editor's write, chmod, rename) are coalesced into
//! one reload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, ConfigErrors, Manifests};

/// Quiet time after the last event before reloading.
pub const SETTLE: Duration = Duration::from_millis(150);

pub struct FileSource {
    path: PathBuf,
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
        Ok(Self { path, _watcher: watcher, changes })
    }

    /// Read and validate the manifests as they are on disk now.
    pub fn load(&self) -> Result<Manifests, ConfigErrors> {
        config::load_path(&self.path)
    }

    /// Wait for the next change on disk, then for the burst to settle.
    /// `None` once the watcher is gone.
    pub async fn changed(&mut self) -> Option<()> {
        self.changes.recv().await?;
        loop {
            match tokio::time::timeout(SETTLE, self.changes.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) | Err(_) => return Some(()),
            }
        }
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
