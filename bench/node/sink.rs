//! Where the churn benchmark's Services live and how their changes reach
//! ringport: one manifest file, a directory of files of [`PER_FILE`]
//! Services (the probe Service, the last index, in a file of its own), or
//! the fake API server. Changes are set in memory and written together by
//! [`Sink::flush`], each file atomically (temp + rename); the API applies
//! each change at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::json;

use crate::{fake_api, node};

/// Services per file in the directory layout.
pub const PER_FILE: usize = 100;

/// Where Services' manifests go, and how changes reach ringport: in
/// memory first ([`Sink::set`]), then written by [`Sink::flush`] (the API
/// applies at once).
pub enum Sink {
    File { path: PathBuf, docs: Vec<String>, dirty: bool },
    Dir { dir: PathBuf, docs: Vec<String>, dirty: BTreeSet<usize> },
    Api(fake_api::FakeApi),
}

impl Sink {
    fn doc(i: usize, eps: &[(String, u16)], trigger: Option<SystemTime>) -> String {
        format!("{}\n{}\n", node::service(i), node::slice(i, eps, trigger))
    }

    fn file_of(dir: &Path, i: usize, probe: usize) -> PathBuf {
        if i == probe { dir.join("probe.json") } else { dir.join(format!("g{:04}.json", i / PER_FILE)) }
    }

    /// Write (or serve) the whole world once. Index `probe` is last.
    pub fn new(kind: &str, world: &[Vec<(String, u16)>], scratch: &Path) -> Sink {
        let probe = world.len() - 1;
        let docs: Vec<String> = world.iter().enumerate().map(|(i, e)| Sink::doc(i, e, None)).collect();
        match kind {
            "file" => {
                let path = scratch.join("services.json");
                node::write_atomic(&path, docs.concat().as_bytes());
                Sink::File { path, docs, dirty: false }
            }
            "dir" => {
                let dir = scratch.join("services");
                std::fs::create_dir_all(&dir).expect("manifest dir");
                let mut files: BTreeMap<PathBuf, String> = BTreeMap::new();
                for (i, d) in docs.iter().enumerate() {
                    files.entry(Sink::file_of(&dir, i, probe)).or_default().push_str(d);
                }
                for (f, text) in files {
                    node::write_atomic(&f, text.as_bytes());
                }
                Sink::Dir { dir, docs, dirty: Default::default() }
            }
            "api" => {
                let mut objects = vec![fake_api::node("bench-node", "z1", json!({}), json!({}))];
                for (i, e) in world.iter().enumerate() {
                    objects.push(node::service(i));
                    objects.push(node::slice(i, e, None));
                }
                Sink::Api(fake_api::FakeApi::start(objects))
            }
            other => panic!("bench/churn.rs: unknown source {other} (file, dir, api)"),
        }
    }

    /// ringport's arguments for this source.
    pub fn ringport_args(&self, scratch: &Path) -> Vec<String> {
        match self {
            Sink::File { path, .. } => {
                vec!["--source".into(), "file".into(), "--config".into(), path.display().to_string()]
            }
            Sink::Dir { dir, .. } => {
                vec!["--source".into(), "file".into(), "--config".into(), dir.display().to_string()]
            }
            Sink::Api(api) => {
                let kubeconfig = api.kubeconfig(scratch);
                let k = kubeconfig.display().to_string();
                ["--source", "kube", "--kubeconfig", &k, "--node-name", "bench-node"]
                    .map(String::from)
                    .to_vec()
            }
        }
    }

    /// Service `i`'s endpoints become `eps`, stamped now.
    pub fn set(&mut self, i: usize, eps: &[(String, u16)]) {
        let now = SystemTime::now();
        match self {
            Sink::File { docs, dirty, .. } => {
                docs[i] = Sink::doc(i, eps, Some(now));
                *dirty = true;
            }
            Sink::Dir { docs, dirty, .. } => {
                docs[i] = Sink::doc(i, eps, Some(now));
                dirty.insert(i);
            }
            Sink::Api(api) => api.apply(node::slice(i, eps, Some(now))),
        }
    }

    /// Write every file changed since the last flush (temp + rename):
    /// the number of files written.
    pub fn flush(&mut self) -> u64 {
        match self {
            Sink::File { path, docs, dirty } => {
                let n = u64::from(std::mem::take(dirty));
                if n > 0 {
                    node::write_atomic(path, docs.concat().as_bytes());
                }
                n
            }
            Sink::Dir { dir, docs, dirty } => {
                let probe = docs.len() - 1;
                let files: BTreeSet<usize> = std::mem::take(dirty)
                    .into_iter()
                    .map(|i| if i == probe { usize::MAX } else { i / PER_FILE })
                    .collect();
                for &f in &files {
                    let (file, range) = if f == usize::MAX {
                        (Sink::file_of(dir, probe, probe), probe..probe + 1)
                    } else {
                        (
                            Sink::file_of(dir, f * PER_FILE, probe),
                            f * PER_FILE..((f + 1) * PER_FILE).min(probe),
                        )
                    };
                    node::write_atomic(&file, docs[range].concat().as_bytes());
                }
                files.len() as u64
            }
            Sink::Api(_) => 0,
        }
    }
}
