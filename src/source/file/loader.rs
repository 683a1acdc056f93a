//! Reading the manifest files under `--config` into what changed since the
//! last load that was served.
//!
//! A file is read again only when its stamp (device, inode, size, mtime and
//! ctime, of the file a link points to) differs from the stamp of the
//! version served, or when that version was written less than [`RACY`]
//! before it was read (a filesystem's timestamps tick coarsely, e.g. ext4's
//! every few ms, and an inode number is reused: a second write in the same
//! tick could keep the stamp, as git's "racy clean" entries); it is parsed
//! again only when its text differs (by hash), and then only the documents
//! whose text or index differ from the version served
//! ([`config::parse_changed`]): the others lend their objects, shared. A
//! SIGHUP reads every file again. The
//! changed files' objects are compared with what those files held before,
//! and only the objects that differ go into a [`Delta`]: a file rewritten
//! with one slice changed costs the table one slice. A directory of a
//! thousand files thus costs a `stat` of each per change, a read and a
//! split of the one that changed, and a parse of its changed documents.
//!
//! Invariants:
//! - What is served is known per file (`served`), and only changes when
//!   the control plane took a load ([`FileLoader::commit`]): a refused load
//!   is diffed again, whole, at the next one, so nothing it carried is lost.
//! - A load with any error (a file unreadable or invalid) is refused whole,
//!   naming the file, and the last good state keeps serving.
//! - Any name held twice (a duplicate Service or slice across files, or an
//!   Endpoints' subsets, which share their object's name) makes the load a
//!   whole state: the table's join then reports a duplicate with both
//!   places, exactly as for a whole load, and keeps several slices of one
//!   name apart, which a delta (one value per name) cannot.
//! - A file that is emptied, or gone at a load, or invalid but written less
//!   than [`SETTLE`] before it was read, keeps its objects through that
//!   load (a write in progress), and the load asks for a recheck; gone (or
//!   invalid) still at the next load, [`SETTLE`] later, its objects are
//!   removed (or the error refuses the load).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::SETTLE;
use crate::config::{
    self, ConfigError, ConfigErrorKind, ConfigErrors, Documents, Manifests, Warning, WarningKind,
};
use crate::model::{Origin, ServiceName};
use crate::source::Change;
use crate::table::Delta;

/// Which file version was read: a file rewritten, replaced by a rename or
/// re-pointed by a link swap (a ConfigMap mount) gets another stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(file: &Path) -> std::io::Result<Stamp> {
        let m = std::fs::metadata(file)?;
        Ok(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// How long after a file's last write its stamp may still hide a later
/// write: the file is read again (and its text compared) until it was read
/// this long after its last write.
pub const RACY: std::time::Duration = std::time::Duration::from_secs(1);

/// The version of a file that was read: its stamp, a hash of its text, and
/// when it was read.
#[derive(Clone, Copy, Debug)]
struct Version {
    stamp: Stamp,
    hash: u64,
    read_at: SystemTime,
}

impl Version {
    /// Written so shortly before it was read that a later write may have
    /// kept its stamp.
    fn racy(&self) -> bool {
        self.written().is_none_or(|w| w + RACY > self.read_at)
    }

    /// When the file was last written (its mtime), if that is readable.
    fn written(&self) -> Option<SystemTime> {
        let (secs, nanos) = self.stamp.mtime;
        let since = std::time::Duration::new(u64::try_from(secs).ok()?, u32::try_from(nanos).ok()?);
        std::time::UNIX_EPOCH.checked_add(since)
    }
}

/// A name in the table (Services and slices have separate names), by its
/// hash: the loader holds one per object served, and a name would be one
/// more copy of every name. Two names of one hash only look crowded, which
/// costs a whole state (the table then finds no duplicate), never a delta
/// that is wrong.
type Key = u64;

fn keys(m: &Manifests) -> impl Iterator<Item = Key> + '_ {
    let services = m.services.iter().map(|s| key(true, &s.name));
    services.chain(m.slices.iter().map(|s| key(false, &s.id)))
}

fn key(service: bool, name: &ServiceName) -> Key {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (service, name).hash(&mut h);
    h.finish()
}

/// One version of a file: when it was read, its objects, and where each
/// of its documents went (so that its next version parses only the
/// documents that changed).
#[derive(Debug)]
struct Held {
    version: Version,
    manifests: Manifests,
    documents: Documents,
}

/// The files a load found changed, each with its new version (`None`:
/// removed).
type Changed = Vec<(PathBuf, Option<Held>)>;

/// Reads the manifests under a path, as changes to what is served (module
/// header).
#[derive(Debug)]
pub struct FileLoader {
    path: PathBuf,
    /// Per file: the version served.
    served: BTreeMap<PathBuf, Held>,
    /// The name of each object served, sorted (a name held twice is there
    /// twice): 8 bytes an object, where a map of counts took 22.
    held: Vec<Key>,
    /// The names more than one object holds.
    crowded: HashSet<Key>,
    /// Files found gone at a load, whose objects were kept once.
    gone: HashSet<PathBuf>,
    /// The changed files of the last load (`None`: removed), until
    /// [`FileLoader::commit`].
    proposed: Option<Changed>,
    /// A load has been served: later loads can be deltas.
    committed: bool,
    /// Trigger times before this are not this process's to measure.
    started: SystemTime,
    /// Time this load spent reading files and parsing them.
    spent: Spent,
}

/// Where a load's time went, logged for the first load (the start).
#[derive(Debug, Default)]
struct Spent {
    files: usize,
    bytes: usize,
    read: std::time::Duration,
    parse: std::time::Duration,
    /// Documents parsed (those whose text was unchanged were not).
    documents: usize,
}

/// One load: the change or every error, whether a file's objects were kept
/// because it was gone (then load again after `SETTLE`), and the trigger
/// times of the slices it changes.
#[derive(Debug)]
pub struct Loaded {
    pub result: Result<Change, ConfigErrors>,
    pub recheck: bool,
    pub triggers: Vec<SystemTime>,
    /// Also logged.
    pub warnings: Vec<Warning>,
}

/// What the load found in one listed file.
enum Read {
    /// The version served: nothing to do.
    Same,
    /// Emptied: its objects are kept (a write in progress).
    Empty,
    /// Invalid, but just written: its objects are kept (a write in place,
    /// half done), and it is read again [`SETTLE`] later.
    Unsettled,
    /// A new version, with its objects.
    New(Held),
    Failed(Vec<ConfigError>),
}

impl FileLoader {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            served: BTreeMap::new(),
            held: Vec::new(),
            crowded: HashSet::new(),
            gone: HashSet::new(),
            proposed: None,
            committed: false,
            started: SystemTime::now(),
            spent: Spent::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read what changed on disk since the state served, as a change to it;
    /// with `reread` (SIGHUP), every file, as a whole state.
    pub fn load(&mut self, reread: bool) -> Loaded {
        self.spent = Spent::default();
        let listed = config::manifest_files(&self.path);
        let mut errors = listed.errors;
        let mut warnings = listed.warnings;
        let mut changed = Vec::new();
        let mut present = HashSet::new();
        let mut recheck = false;
        for file in listed.files {
            present.insert(file.clone());
            match self.read(&file, reread) {
                Read::Same => {}
                Read::Empty => warnings.push(kept(&file, WarningKind::EmptyFileKept)),
                Read::Unsettled => {
                    recheck = true;
                    warnings.push(kept(&file, WarningKind::UnsettledFileKept));
                }
                Read::New(new) => match self.served.get_mut(&file) {
                    // Reformatted, not changed: only the version is new
                    // (and where its documents went, warnings included).
                    Some(served) if same_objects(&served.manifests, &new.manifests) => {
                        served.version = new.version;
                        served.documents = new.documents;
                        served.manifests.warnings = new.manifests.warnings;
                    }
                    _ => changed.push((file, Some(new))),
                },
                Read::Failed(e) => errors.extend(e),
            }
        }
        let vanished: Vec<PathBuf> = self.served.keys().filter(|f| !present.contains(*f)).cloned().collect();
        for file in vanished {
            if self.gone.insert(file.clone()) {
                recheck = true;
                warnings.push(kept(&file, WarningKind::VanishedFileKept));
            } else {
                tracing::info!(file = %file.display(), "manifest file removed: its objects are no longer served");
                changed.push((file, None));
            }
        }
        // Back again (or no longer served): a later disappearance gets its
        // grace again.
        self.gone.retain(|f| !present.contains(f) && self.served.contains_key(f));
        if let Some(errors) = ConfigErrors::from_vec(errors) {
            self.proposed = None;
            return Loaded { result: Err(errors), recheck, triggers: Vec::new(), warnings };
        }
        if !self.committed {
            let s = &self.spent;
            tracing::info!(
                files = s.files,
                bytes = s.bytes,
                objects = changed
                    .iter()
                    .flat_map(|(_, new)| new)
                    .map(|h| h.manifests.services.len() + h.manifests.slices.len())
                    .sum::<usize>(),
                documents = s.documents,
                read_ms = s.read.as_secs_f64() * 1e3,
                parse_ms = s.parse.as_secs_f64() * 1e3,
                "manifests read"
            );
        }
        let triggers = self.triggers(&changed);
        // A SIGHUP asks for everything again: a whole state.
        let change = if self.committed && !reread && self.crowded_after(&changed).is_empty() {
            Change::Delta(self.delta(&changed))
        } else {
            Change::Whole(self.whole(&changed))
        };
        self.proposed = Some(changed);
        Loaded { result: Ok(change), recheck, triggers, warnings }
    }

    /// The last load is served now.
    pub fn commit(&mut self) {
        let Some(changed) = self.proposed.take() else { return };
        let (mut removed, mut added) = (Vec::new(), Vec::new());
        for (file, new) in changed {
            if let Some(old) = self.served.remove(&file) {
                removed.extend(keys(&old.manifests));
            }
            match new {
                Some(new) => {
                    added.extend(keys(&new.manifests));
                    self.served.insert(file, new);
                }
                None => {
                    self.gone.remove(&file);
                }
            }
        }
        added.sort_unstable();
        removed.sort_unstable();
        let (mut added, mut removed) = net(&added, &removed);
        update(&mut self.held, &added, &removed);
        if added.len() + removed.len() > self.held.len() / 16 {
            // Most names (a first load): one pass over them all.
            self.crowded = self.held.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
        } else {
            // Only the names held once more or once less can be crowded
            // or no longer.
            added.dedup();
            removed.dedup();
            for key in added.into_iter().chain(removed) {
                if holders(&self.held, key) > 1 {
                    self.crowded.insert(key);
                } else {
                    self.crowded.remove(&key);
                }
            }
        }
        self.committed = true;
    }

    /// One listed file, read again unless its stamp is the served one's
    /// (and not racy), parsed again unless its text is.
    fn read(&mut self, file: &Path, reread: bool) -> Read {
        let stamp = match Stamp::of(file) {
            Ok(stamp) => stamp,
            Err(e) => return Read::Failed(vec![file_error(file, ConfigErrorKind::Io(e))]),
        };
        let served = self.served.get(file).map(|h| h.version);
        if !reread && served.is_some_and(|v| v.stamp == stamp && !v.racy()) {
            self.gone.remove(file);
            return Read::Same;
        }
        let read_at = SystemTime::now();
        let clock = std::time::Instant::now();
        let text = match config::read_manifest(file) {
            Ok(text) => text,
            Err(kind) => return Read::Failed(vec![file_error(file, kind)]),
        };
        self.spent.read += clock.elapsed();
        (self.spent.files, self.spent.bytes) = (self.spent.files + 1, self.spent.bytes + text.len());
        let version = Version { stamp, hash: config::hash_text(&text), read_at };
        if let Some(h) = self.served.get_mut(file)
            && h.version.hash == version.hash
        {
            h.version = version;
            self.gone.remove(file);
            return Read::Same;
        }
        if text.trim().is_empty() {
            // Kept if it was served; a new empty file serves nothing yet.
            return if served.is_some() { Read::Empty } else { Read::Same };
        }
        let clock = std::time::Instant::now();
        let before = self.served.get(file).map(|h| (&h.manifests, &h.documents));
        let parsed = config::parse_changed(&text, &file.display().to_string(), before);
        self.spent.parse += clock.elapsed();
        self.spent.documents += parsed.parsed;
        match parsed.result {
            Ok((manifests, documents)) => Read::New(Held { version, manifests, documents }),
            Err(_) if version.written().is_some_and(|w| w + SETTLE > read_at) => Read::Unsettled,
            Err(e) => Read::Failed(e.into_vec()),
        }
    }

    /// The names more than one object would hold once `changed` is served.
    fn crowded_after(&self, changed: &Changed) -> HashSet<Key> {
        let mut after: HashMap<Key, i64> = HashMap::new();
        for (file, new) in changed {
            for key in self.served.get(file).into_iter().flat_map(|h| keys(&h.manifests)) {
                *after.entry(key).or_insert(0) -= 1;
            }
            for key in new.iter().flat_map(|h| keys(&h.manifests)) {
                *after.entry(key).or_insert(0) += 1;
            }
        }
        let mut crowded: HashSet<Key> =
            self.crowded.iter().filter(|k| !after.contains_key(*k)).copied().collect();
        for (key, d) in after {
            let holders = i64::try_from(holders(&self.held, key)).unwrap_or(i64::MAX);
            if holders.saturating_add(d) > 1 {
                crowded.insert(key);
            }
        }
        crowded
    }

    /// The objects that differ once `changed` is served, when no name is
    /// held twice (so each touched name has one value, or none).
    fn delta(&self, changed: &Changed) -> Delta {
        let mut delta = Delta::default();
        let old = changed.iter().filter_map(|(file, _)| self.served.get(file).map(|h| &h.manifests));
        let new = changed.iter().filter_map(|(_, new)| new.as_ref().map(|h| &h.manifests));
        let (mut services, mut slices) = (BTreeMap::new(), BTreeMap::new());
        for m in old {
            services.extend(m.services.iter().map(|s| (&s.name, s)));
            slices.extend(m.slices.iter().map(|s| (&s.id, s)));
        }
        for m in new {
            for s in &m.services {
                if !services.remove(&s.name).is_some_and(|old| same(old, s)) {
                    delta.services.insert(s.name.clone(), Some(s.clone()));
                }
            }
            for s in &m.slices {
                if !slices.remove(&s.id).is_some_and(|old| same(old, s)) {
                    delta.slices.insert(s.id.clone(), Some(s.clone()));
                }
            }
        }
        // What the changed files held and no longer hold.
        delta.services.extend(services.into_keys().map(|name| (name.clone(), None)));
        delta.slices.extend(slices.into_keys().map(|id| (id.clone(), None)));
        delta
    }

    /// Everything served once `changed` is: each object shared, not copied.
    fn whole(&self, changed: &Changed) -> Manifests {
        let touched: HashSet<&PathBuf> = changed.iter().map(|(f, _)| f).collect();
        let mut out = Manifests::default();
        let unchanged = self.served.iter().filter(|(f, _)| !touched.contains(f)).map(|(_, h)| &h.manifests);
        let new = changed.iter().filter_map(|(_, new)| new.as_ref().map(|h| &h.manifests));
        for m in unchanged.chain(new) {
            out.services.extend(m.services.iter().cloned());
            out.slices.extend(m.slices.iter().cloned());
        }
        out
    }

    /// The trigger times of the slices `changed` brings that are new (a
    /// stamp the file did not hold for that slice), from this process's
    /// time on. A first load times nothing: it is not a change.
    fn triggers(&self, changed: &Changed) -> Vec<SystemTime> {
        if !self.committed {
            return Vec::new();
        }
        let old: HashSet<(&ServiceName, SystemTime)> = changed
            .iter()
            .filter_map(|(file, _)| self.served.get(file))
            .flat_map(|h| h.manifests.slices.iter().filter_map(|s| Some((&s.id, s.trigger?))))
            .collect();
        changed
            .iter()
            .filter_map(|(_, new)| new.as_ref())
            .flat_map(|h| h.manifests.slices.iter().filter_map(|s| Some((&s.id, s.trigger?))))
            .filter(|(id, t)| *t >= self.started && !old.contains(&(*id, *t)))
            .map(|(_, t)| t)
            .collect()
    }
}

/// Takes one of each of `removed` (sorted, and held: they are the keys of
/// objects served) out of the sorted keys `held`, and puts `added`
/// (sorted) in, in place
/// (a map of counts cost 22 bytes a name): each run of keys between two
/// changes moves once, in memory already in use.
fn update(held: &mut Vec<Key>, added: &[Key], removed: &[Key]) {
    // Out: the runs move down over the keys removed.
    let (mut read, mut write) = (0, 0);
    for &key in removed {
        let at = read + held[read..].partition_point(|k| *k < key);
        // A key removed that is not held (never: commit removes only what
        // it added) takes nothing.
        if held.get(at) == Some(&key) {
            held.copy_within(read..at, write);
            (write, read) = (write + at - read, at + 1);
        }
    }
    let len = held.len();
    held.copy_within(read..len, write);
    held.truncate(write + len - read);
    // In: from the back, the runs move up over the keys added.
    let mut end = held.len();
    held.reserve_exact(added.len());
    held.resize(end + added.len(), 0);
    let mut top = held.len();
    for &key in added.iter().rev() {
        let at = held[..end].partition_point(|k| *k <= key);
        held.copy_within(at..end, top - (end - at));
        top -= end - at + 1;
        held[top] = key;
        end = at;
    }
}

/// The keys `added` and `removed` (sorted) less those in both: a file
/// rewritten mostly keeps its names, and then moves no key of `held`.
fn net(added: &[Key], removed: &[Key]) -> (Vec<Key>, Vec<Key>) {
    use std::cmp::Ordering;
    let (mut a, mut r) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while let (Some(&x), Some(&y)) = (added.get(i), removed.get(j)) {
        match x.cmp(&y) {
            Ordering::Less => {
                a.push(x);
                i += 1;
            }
            Ordering::Greater => {
                r.push(y);
                j += 1;
            }
            Ordering::Equal => (i, j) = (i + 1, j + 1),
        }
    }
    a.extend_from_slice(&added[i..]);
    r.extend_from_slice(&removed[j..]);
    (a, r)
}

/// How many objects served hold `key`.
fn holders(held: &[Key], key: Key) -> usize {
    let start = held.partition_point(|k| *k < key);
    held[start..].iter().take_while(|k| **k == key).count()
}

fn same_objects(a: &Manifests, b: &Manifests) -> bool {
    let services =
        a.services.len() == b.services.len() && a.services.iter().zip(&b.services).all(|(a, b)| same(a, b));
    services && a.slices.len() == b.slices.len() && a.slices.iter().zip(&b.slices).all(|(a, b)| same(a, b))
}

/// Equal objects: one shared copy (a document reused), or equal by value.
fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

fn file_error(file: &Path, kind: ConfigErrorKind) -> ConfigError {
    ConfigError { origin: Origin::new(file.display().to_string()), object: None, field: None, kind }
}

fn kept(file: &Path, kind: WarningKind) -> Warning {
    let warning =
        Warning { origin: Origin::new(file.display().to_string()), object: None, field: None, kind };
    tracing::warn!(%warning, "manifest warning");
    warning
}

#[cfg(test)]
mod tests;
