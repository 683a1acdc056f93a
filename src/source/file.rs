//! Manifests from a file or a directory, reloaded when they change on disk
//! (inotify through the `notify` crate, never a timer) or on SIGHUP.
//!
//! The watch is on the directory, not on the file's inode, so editors that
//! save by writing a new file and renaming it over the old one are seen.
//! Bursts of events (an editor's write, chmod, rename) are coalesced into
//! one reload.
//!
//! The [`FileLoader`] reads a directory file by file and keeps each file's
//! last good objects through what looks like a write in progress: a file
//! that is empty, or one that is gone at a reload (it is kept for that
//! reload, and dropped only if still gone at the next one, which follows
//! [`SETTLE`] later). A file deleted on purpose thus takes its Services with
//! it, one settle period later. A single `--config` file that is missing is
//! an error, and its last good configuration keeps serving.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, ConfigErrors, Manifests, Warning, WarningKind};
use crate::model::Origin;

/// Quiet time after the last event before reloading.
pub const SETTLE: Duration = Duration::from_millis(150);

pub struct FileSource {
    /// Kept alive for as long as the source watches.
    _watcher: RecommendedWatcher,
    changes: mpsc::UnboundedReceiver<()>,
    /// A change was seen and its burst has not settled yet.
    dirty: bool,
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
        Ok(Self { _watcher: watcher, changes, dirty: false })
    }

    /// Wait for the next change on disk, then for the burst to settle.
    /// `None` once the watcher is gone.
    ///
    /// Cancel-safe (the run loop selects on it beside reloads finishing): a
    /// change seen before a cancellation is remembered, and the next call
    /// only waits for the burst to settle.
    pub async fn changed(&mut self) -> Option<()> {
        if !self.dirty {
            self.changes.recv().await?;
            self.dirty = true;
        }
        loop {
            match tokio::time::timeout(SETTLE, self.changes.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) | Err(_) => {
                    self.dirty = false;
                    return Some(());
                }
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

/// Reads the manifests under a path, keeping each file's last good objects
/// through writes in progress (module header).
#[derive(Debug)]
pub struct FileLoader {
    path: PathBuf,
    last_good: HashMap<PathBuf, Manifests>,
    /// Files found gone at the last load, whose objects were kept once.
    gone: HashSet<PathBuf>,
}

/// One load: the manifests or every error, and whether a file's objects
/// were kept because it was gone (then load again after [`SETTLE`]).
#[derive(Debug)]
pub struct Loaded {
    pub result: Result<Manifests, ConfigErrors>,
    pub recheck: bool,
}

impl FileLoader {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), last_good: HashMap::new(), gone: HashSet::new() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read and validate the manifests as they are on disk now.
    pub fn load(&mut self) -> Loaded {
        let listed = config::manifest_files(&self.path);
        let mut errors = listed.errors;
        let mut out = Manifests { warnings: listed.warnings, ..Manifests::default() };
        let mut present = HashSet::new();
        for (file, text) in listed.files {
            present.insert(file.clone());
            let text = match text {
                Ok(text) => text,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            if text.trim().is_empty() {
                if let Some(kept) = self.last_good.get(&file) {
                    warn_kept(&mut out, &file, WarningKind::EmptyFileKept);
                    merge(&mut out, kept.clone());
                }
                continue;
            }
            match config::parse_str(&text, &file.display().to_string()) {
                Ok(m) => {
                    merge(&mut out, m.clone());
                    self.last_good.insert(file, m);
                }
                Err(e) => errors.extend(e),
            }
        }
        let mut recheck = false;
        let vanished: Vec<PathBuf> =
            self.last_good.keys().filter(|f| !present.contains(*f)).cloned().collect();
        for file in vanished {
            if self.gone.insert(file.clone()) {
                recheck = true;
                warn_kept(&mut out, &file, WarningKind::VanishedFileKept);
                if let Some(kept) = self.last_good.get(&file) {
                    merge(&mut out, kept.clone());
                }
            } else {
                tracing::info!(file = %file.display(), "manifest file removed: its objects are no longer served");
                self.gone.remove(&file);
                self.last_good.remove(&file);
            }
        }
        self.gone.retain(|f| !present.contains(f));
        let result = match ConfigErrors::from_vec(errors) {
            Some(errors) => Err(errors),
            None => Ok(out),
        };
        Loaded { result, recheck }
    }
}

fn merge(into: &mut Manifests, from: Manifests) {
    into.services.extend(from.services);
    into.slices.extend(from.slices);
    into.warnings.extend(from.warnings);
}

fn warn_kept(out: &mut Manifests, file: &Path, kind: WarningKind) {
    let warning = Warning { origin: Origin(file.display().to_string()), object: None, field: None, kind };
    tracing::warn!(%warning, "manifest warning");
    out.warnings.push(warning);
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";

    fn names(loaded: &Loaded) -> Vec<String> {
        let m = loaded.result.as_ref().unwrap();
        m.services.iter().map(|s| s.name.name.clone()).collect()
    }

    #[test]
    fn an_emptied_file_keeps_its_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        fs::write(&file, WEB).unwrap();
        let mut loader = FileLoader::new(dir.path());
        assert_eq!(names(&loader.load()), ["web"]);
        fs::write(&file, "").unwrap();
        let loaded = loader.load();
        assert_eq!(names(&loaded), ["web"]);
        let warnings = &loaded.result.as_ref().unwrap().warnings;
        assert!(warnings.iter().any(|w| w.kind == WarningKind::EmptyFileKept), "{warnings:?}");
    }

    #[test]
    fn a_vanished_file_is_kept_for_one_reload_then_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        fs::write(&file, WEB).unwrap();
        fs::write(dir.path().join("api.yaml"), WEB.replace("web", "api")).unwrap();
        let mut loader = FileLoader::new(dir.path());
        assert_eq!(names(&loader.load()).len(), 2);
        fs::remove_file(&file).unwrap();
        let first = loader.load();
        assert!(first.recheck);
        assert_eq!(names(&first).len(), 2, "kept while it may be a write in progress");
        let second = loader.load();
        assert!(!second.recheck);
        assert_eq!(names(&second), ["api"], "still gone: deleted on purpose");
        // Back again: served again, and a later disappearance is again
        // given one reload's grace.
        fs::write(&file, WEB).unwrap();
        assert_eq!(names(&loader.load()).len(), 2);
    }

    #[test]
    fn a_dangling_link_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("api.yaml"), WEB).unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere.yaml"), dir.path().join("web.yaml")).unwrap();
        let errors = FileLoader::new(dir.path()).load().result.unwrap_err().to_string();
        assert!(errors.contains("web.yaml") && errors.contains("dangling"), "{errors}");
    }
}
