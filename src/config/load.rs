//! Manifest files -> typed Kubernetes objects -> validated model objects.
//!
//! A path is one file, or a directory whose `*.yaml`, `*.yml` and `*.json`
//! files are read in name order (not recursively; names starting with `.`
//! are skipped, which also skips a ConfigMap mount's `..data` and editors'
//! lock files). YAML files may hold several `---` documents; JSON files one
//! or more concatenated objects. Each document is dispatched on
//! `apiVersion`/`kind`: `v1/Service`, `v1/Endpoints`,
//! `discovery.k8s.io/v1/EndpointSlice`, and `v1/List` (or a typed
//! `ServiceList`, ...) holding those. Other kinds are skipped with a
//! warning, empty documents silently.
//!
//! Invariants: document indexes are 1-based and count empty documents, so
//! they match what a reader counts in the file; every error of every file is
//! collected before failing; fields the Kubernetes types do not know are
//! reported as warnings rather than silently dropped, because a misspelt
//! `targetPort` would otherwise mean "same as port".
//!
//! A file's next version can be parsed in part ([`parse_changed`]): its
//! text is cut into documents without parsing it (`split`), and a document
//! whose text and index are those of the previous parse lends its objects
//! (shared, origins and all: the index is part of what must match, so an
//! origin never names a stale index); only the others are parsed. Whatever
//! the split cannot cut exactly, and any syntax error (whose position is
//! the whole text's), is parsed whole as before, so errors, warnings and
//! document indexes are exactly those of [`parse_str`].
//!
//! Hostile input is bounded before the parser sees it: a file larger than
//! [`MAX_FILE_BYTES`] is not read at all, and a YAML file whose flow
//! collections (`[`, `{`) nest deeper than [`MAX_FLOW_DEPTH`] is refused by
//! a linear pre-scan, because libyaml's scanner is quadratic in flow depth
//! (100k nested `[` took 30 s). Block nesting and alias expansion are bounded
//! by the YAML crate itself (its recursion and repetition limits).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_norway::{Mapping, Value};

use super::{
    ConfigError, ConfigErrorKind, ConfigErrors, Conversion, Manifests, ObjectRef, Warning, WarningKind,
    service_from_k8s, slice_from_endpoints, slice_from_k8s,
};
use crate::model::{Name, Origin, ServiceName};

mod fields;
mod json;
mod reuse;
mod split;
use fields::KnownFields;
use json::JsonDocument;
pub use reuse::{Documents, Parsed, parse_changed};

/// The largest manifest file read. The API server takes request bodies of
/// up to 3 MiB; a file of many objects may be larger, but not this large.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// The deepest nesting of YAML flow collections (`[` / `{`) accepted. A
/// Kubernetes object nests a handful of levels.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Reads a manifest file, or every manifest file of a directory, and
/// validates each object. Fails with every error of every file.
pub fn load_path(path: &Path) -> Result<Manifests, ConfigErrors> {
    let mut collector = Collector::default();
    for file in collector.manifest_files(path) {
        let name = file.display().to_string();
        match read_bounded(&file) {
            Ok(text) => collector.file(&text, &name),
            Err(kind) => collector.errors.push(file_error(&name, kind)),
        }
    }
    collector.finish()
}

/// The files `load_path` reads under a path, not yet read.
#[derive(Debug, Default)]
pub struct ManifestFiles {
    pub files: Vec<PathBuf>,
    /// Problems with the path itself (a missing directory, a dangling link).
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<Warning>,
}

/// Lists the manifest files under `path`, for a source that treats them
/// one by one (and reads each with [`read_manifest`]).
pub fn manifest_files(path: &Path) -> ManifestFiles {
    let mut collector = Collector::default();
    let files = collector.manifest_files(path);
    ManifestFiles { files, errors: collector.errors, warnings: collector.manifests.warnings }
}

/// One manifest file's text, or what kept it from being read (a dangling
/// link, a file too large).
pub fn read_manifest(file: &Path) -> Result<String, ConfigErrorKind> {
    read_bounded(file)
}

/// A file's text, unless it is larger than [`MAX_FILE_BYTES`] (checked on
/// the open file, and again while reading, so a file that grows meanwhile
/// cannot slip past).
fn read_bounded(file: &Path) -> Result<String, ConfigErrorKind> {
    use std::io::Read;
    let opened = fs::File::open(file).map_err(ConfigErrorKind::Io)?;
    let size = opened.metadata().map_err(ConfigErrorKind::Io)?.len();
    if size > MAX_FILE_BYTES {
        return Err(ConfigErrorKind::TooLarge { size, max: MAX_FILE_BYTES });
    }
    // Sized once (a file that grew meanwhile still reads, in more steps):
    // growing by doubling would copy a large file's text several times.
    let mut bytes = Vec::with_capacity(size as usize + 1);
    opened.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(ConfigErrorKind::Io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigErrorKind::TooLarge { size: bytes.len() as u64, max: MAX_FILE_BYTES });
    }
    String::from_utf8(bytes)
        .map_err(|e| ConfigErrorKind::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Validates one file's text; `file` names it in errors and, ending in
/// `.json`, selects the JSON parser (YAML otherwise).
pub fn parse_str(text: &str, file: &str) -> Result<Manifests, ConfigErrors> {
    let mut collector = Collector::default();
    collector.file(text, file);
    collector.finish()
}

/// Whether a YAML text nests flow collections deeper than
/// [`MAX_FLOW_DEPTH`]: the parser's scan of such a text takes time
/// quadratic in its depth, so nothing may hand it to the parser.
pub fn too_deep(text: &str) -> bool {
    flow_depth(text, MAX_FLOW_DEPTH) > MAX_FLOW_DEPTH
}

/// The deepest nesting of flow collections in a YAML text, counted in one
/// linear pass; stops counting past `limit`. Brackets in comments and
/// quoted scalars do not count, nor do brackets inside a word (`a[0]`), so
/// the count never exceeds what the parser would see; it may fall short of
/// it (e.g. in a block scalar), which only makes the bound lenient there.
fn flow_depth(text: &str, limit: usize) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut quote: Option<u8> = None;
    let mut comment = false;
    let (mut prev, mut before) = (b'\n', b'\n');
    let mut escaped = false;
    for &b in text.as_bytes() {
        if comment {
            comment = !ends_line(before, prev, b);
        } else if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if q == b'"' && b == b'\\' {
                escaped = true;
            } else if b == q {
                quote = None;
            }
        } else {
            let token_start = prev.is_ascii_whitespace() || matches!(prev, b'[' | b'{' | b',' | b':');
            match b {
                b'#' if prev.is_ascii_whitespace() => comment = true,
                b'\'' | b'"' if token_start => quote = Some(b),
                b'[' | b'{' if token_start => {
                    depth += 1;
                    deepest = deepest.max(depth);
                    if deepest > limit {
                        return deepest;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        (before, prev) = (prev, b);
    }
    deepest
}

/// Whether byte `b`, after `before` and `prev`, ends a line as libyaml sees
/// it: `\n`, `\r` (alone too), or the last byte of NEL (U+0085), LS
/// (U+2028) or PS (U+2029). A comment runs to the first of these: a comment
/// taken to run to `\n` alone let `#\r` hide a line of brackets from the
/// bound, and the parser then spent seconds on it.
fn ends_line(before: u8, prev: u8, b: u8) -> bool {
    matches!(b, b'\n' | b'\r')
        || (prev == 0xC2 && b == 0x85)
        || (before == 0xE2 && prev == 0x80 && matches!(b, 0xA8 | 0xA9))
}

/// Whether a text breaks a line anywhere with something libyaml reads as a
/// line break but a split on `\n` does not: a `\r` not followed by `\n`,
/// NEL, LS or PS.
pub(super) fn other_line_breaks(text: &str) -> bool {
    text.contains(['\u{85}', '\u{2028}', '\u{2029}'])
        || text.as_bytes().windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n')
        || text.ends_with('\r')
}

fn file_error(file: &str, kind: ConfigErrorKind) -> ConfigError {
    origin_error(Origin::new(file), kind)
}

fn origin_error(origin: Origin, kind: ConfigErrorKind) -> ConfigError {
    ConfigError { origin, object: None, field: None, kind }
}

/// Where a document sits: `file (document 2)` or, for an item of a List,
/// `file (document 2, items[0])`.
#[derive(Clone, Copy)]
struct Place<'a> {
    file: &'a Name,
    document: usize,
    item: Option<usize>,
}

impl Place<'_> {
    fn origin(self) -> Origin {
        match self.item {
            None => Origin::document(self.file.clone(), self.document),
            Some(item) => Origin::item(self.file.clone(), self.document, item),
        }
    }
}

#[derive(Default)]
struct Collector {
    manifests: Manifests,
    errors: Vec<ConfigError>,
    known: KnownFields,
    /// Documents parsed (not reused).
    parsed: usize,
    /// When asked for: the ends of what each document parsed made, in the
    /// lists of `manifests` (services, slices, warnings).
    ends: Option<Vec<[usize; 3]>>,
    /// The names of the Services parsed so far, for the EndpointSlices
    /// that follow them to share (a slice's `kubernetes.io/service-name`
    /// was a copy of its Service's name: 24 bytes per slice at 100k).
    service_names: HashSet<ServiceName>,
}

impl Collector {
    fn finish(self) -> Result<Manifests, ConfigErrors> {
        match ConfigErrors::from_vec(self.errors) {
            Some(errors) => Err(errors),
            None => {
                // Kept as long as the file is served: at their length, not
                // with what growing by doubling left (up to half again).
                let mut manifests = self.manifests;
                manifests.services.shrink_to_fit();
                manifests.slices.shrink_to_fit();
                manifests.warnings.shrink_to_fit();
                Ok(manifests)
            }
        }
    }

    fn warn(&mut self, warning: Warning) {
        tracing::warn!(%warning, "manifest warning");
        self.manifests.warnings.push(warning);
    }

    /// The files to read under `path`, in order. Problems reading the
    /// directory itself are recorded and yield no files.
    fn manifest_files(&mut self, path: &Path) -> Vec<PathBuf> {
        let shown = path.display().to_string();
        let is_dir = match fs::metadata(path) {
            Ok(meta) => meta.is_dir(),
            Err(source) => {
                self.errors.push(file_error(&shown, ConfigErrorKind::Io(source)));
                return Vec::new();
            }
        };
        if !is_dir {
            return vec![path.to_owned()];
        }
        let entries = match fs::read_dir(path) {
            Ok(entries) => entries,
            Err(source) => {
                self.errors.push(file_error(&shown, ConfigErrorKind::Io(source)));
                return Vec::new();
            }
        };
        let mut files = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) if is_manifest(&entry.path()) => files.push(entry.path()),
                // A link to nowhere would otherwise vanish silently, taking
                // its Services with it: name it.
                Ok(entry) if is_dangling_manifest_link(&entry.path()) => {
                    self.errors
                        .push(file_error(&entry.path().display().to_string(), ConfigErrorKind::DanglingLink));
                }
                Ok(_) => {}
                Err(source) => self.errors.push(file_error(&shown, ConfigErrorKind::Io(source))),
            }
        }
        files.sort();
        if files.is_empty() {
            self.warn(Warning {
                origin: Origin::new(shown),
                object: None,
                field: None,
                kind: WarningKind::EmptyDirectory,
            });
        }
        files
    }

    fn file(&mut self, text: &str, file: &str) {
        if file.ends_with(".json") {
            self.json_documents(text, file, 1);
        } else if too_deep(text) {
            self.errors.push(file_error(file, ConfigErrorKind::TooDeep { max: MAX_FLOW_DEPTH }));
        } else {
            self.yaml_documents(text, file, 1);
        }
    }

    /// The documents of a YAML text whose first is document `first` of
    /// its file; how many, or `None` after a syntax error.
    fn yaml_documents(&mut self, text: &str, file: &str, first: usize) -> Option<usize> {
        // Every object of the file shares its path.
        let file = &Name::interned(file);
        let mut count = 0;
        for (i, document) in serde_norway::Deserializer::from_str(text).enumerate() {
            let place = Place { file, document: first + i, item: None };
            self.parsed += 1;
            match <Value as serde::Deserialize>::deserialize(document) {
                Ok(value) => {
                    self.document(value, place);
                    self.end_document();
                }
                Err(source) => {
                    // The parser cannot resynchronise after a syntax error:
                    // it would repeat the same error forever.
                    self.errors.push(origin_error(place.origin(), ConfigErrorKind::Yaml(source)));
                    return None;
                }
            }
            count += 1;
        }
        Some(count)
    }

    /// The documents of a JSON text whose first is document `first` of
    /// its file; how many, or `None` after a syntax error.
    fn json_documents(&mut self, text: &str, file: &str, first: usize) -> Option<usize> {
        let stream = serde_json::Deserializer::from_str(text).into_iter::<JsonDocument>();
        let file = &Name::interned(file);
        let mut count = 0;
        for (i, document) in stream.enumerate() {
            let place = Place { file, document: first + i, item: None };
            self.parsed += 1;
            match document.map_err(ConfigErrorKind::Json) {
                Ok(JsonDocument(value)) => {
                    self.document(value, place);
                    self.end_document();
                }
                Err(kind) => {
                    self.errors.push(origin_error(place.origin(), kind));
                    return None;
                }
            }
            count += 1;
        }
        Some(count)
    }

    /// One document (or List item): dispatch on apiVersion/kind.
    fn document(&mut self, value: Value, place: Place<'_>) {
        let origin = place.origin();
        let Value::Mapping(map) = &value else {
            if !value.is_null() {
                self.errors.push(origin_error(origin, ConfigErrorKind::NotAnObject));
            }
            return;
        };
        let api_version = string_at(map, "apiVersion");
        let kind = string_at(map, "kind");
        let object = peek_object(map, kind.unwrap_or("object"));
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            for (field, present) in [("apiVersion", api_version.is_some()), ("kind", kind.is_some())] {
                if !present {
                    self.errors.push(ConfigError {
                        origin: origin.clone(),
                        object: Some(object.clone()),
                        field: Some(field.to_owned()),
                        kind: ConfigErrorKind::Required,
                    });
                }
            }
            return;
        };
        let in_list = place.item.is_some();
        match (api_version, kind) {
            ("v1", "Service") => self.service(value, origin, object),
            ("v1", "Endpoints") => self.endpoints(value, origin, object),
            ("discovery.k8s.io/v1", "EndpointSlice") => self.slice(value, origin, object),
            ("v1", "List" | "ServiceList" | "EndpointsList")
            | ("discovery.k8s.io/v1", "EndpointSliceList")
                if !in_list =>
            {
                let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
                let item_type = item_kind.map(|k| (api_version.to_owned(), k.to_owned()));
                self.list(map, place, item_type.as_ref(), object);
            }
            _ => self.warn(Warning {
                origin,
                object: Some(object),
                field: None,
                kind: WarningKind::UnknownKind { api_version: api_version.to_owned(), kind: kind.to_owned() },
            }),
        }
    }

    /// `items` of a List. Items of a typed list (`ServiceList`) may omit
    /// apiVersion and kind, as the API server writes them.
    fn list(
        &mut self,
        map: &Mapping,
        place: Place<'_>,
        item_type: Option<&(String, String)>,
        object: ObjectRef,
    ) {
        let items = match map.get("items") {
            None | Some(Value::Null) => return,
            Some(Value::Sequence(items)) => items,
            Some(_) => {
                self.errors.push(ConfigError {
                    origin: place.origin(),
                    object: Some(object),
                    field: Some("items".to_owned()),
                    kind: ConfigErrorKind::NotAList,
                });
                return;
            }
        };
        for (i, item) in items.iter().enumerate() {
            let mut item = item.clone();
            if let (Some((api_version, kind)), Value::Mapping(fields)) = (item_type, &mut item) {
                for (key, default) in [("apiVersion", api_version), ("kind", kind)] {
                    if !fields.contains_key(key) {
                        fields.insert(key.into(), default.as_str().into());
                    }
                }
            }
            let item_place = Place { item: Some(i), ..place };
            // An empty item is not an empty document: it is an error.
            if item.is_null() {
                self.errors.push(origin_error(item_place.origin(), ConfigErrorKind::NotAnObject));
                continue;
            }
            self.document(item, item_place);
        }
    }

    fn service(&mut self, value: Value, origin: Origin, object: ObjectRef) {
        let Some(svc) = self.decode::<Service>(value, &origin, &object) else {
            return;
        };
        if let Some(service) = self.accept(service_from_k8s(&svc, origin.clone()), origin, object) {
            self.service_names.insert(service.name.clone());
            self.manifests.services.push(Arc::new(service));
        }
    }

    fn slice(&mut self, value: Value, origin: Origin, object: ObjectRef) {
        let Some(slice) = self.decode::<EndpointSlice>(value, &origin, &object) else {
            return;
        };
        if let Some(mut slice) = self.accept(slice_from_k8s(&slice, origin.clone()), origin, object) {
            if let Some(name) = self.service_names.get(&slice.service) {
                slice.service = name.clone();
            }
            self.manifests.slices.push(Arc::new(slice));
        }
    }

    /// The validated object, with its warnings recorded; `None` when it was
    /// skipped (recorded as a warning) or invalid (its errors recorded).
    fn accept<T>(
        &mut self,
        result: Result<Conversion<T>, ConfigErrors>,
        origin: Origin,
        object: ObjectRef,
    ) -> Option<T> {
        match result {
            Ok(Conversion::Accepted { value, warnings }) => {
                self.manifests.warnings.extend(warnings);
                Some(value)
            }
            Ok(Conversion::Skipped(skip)) => {
                self.skipped(origin, object, skip);
                None
            }
            Err(errors) => {
                self.errors.extend(errors);
                None
            }
        }
    }

    fn endpoints(&mut self, value: Value, origin: Origin, object: ObjectRef) {
        let Some(endpoints) = self.decode::<Endpoints>(value, &origin, &object) else {
            return;
        };
        match slice_from_endpoints(&endpoints, origin) {
            Ok((slices, warnings)) => {
                self.manifests.slices.extend(slices.into_iter().map(Arc::new));
                self.manifests.warnings.extend(warnings);
            }
            Err(errors) => self.errors.extend(errors),
        }
    }

    fn skipped(&mut self, origin: Origin, object: ObjectRef, skip: super::Skip) {
        self.warn(Warning { origin, object: Some(object), field: None, kind: WarningKind::Skipped(skip) });
    }

    /// Deserializes into a k8s-openapi type; an error names the field path.
    /// Fields the type does not know become warnings.
    fn decode<T>(&mut self, value: Value, origin: &Origin, object: &ObjectRef) -> Option<T>
    where
        T: DeserializeOwned + Serialize,
    {
        // Tracking the path costs an allocation per key: only a document
        // that fails is decoded again to say where (it fails the same way).
        let decoded: Result<T, _> = match <T as serde::Deserialize>::deserialize(&value) {
            Ok(typed) => Ok(typed),
            Err(_) => serde_path_to_error::deserialize(&value),
        };
        match decoded {
            Ok(typed) => {
                for field in self.known.unknown_fields(&value, &typed) {
                    self.warn(Warning {
                        origin: origin.clone(),
                        object: Some(object.clone()),
                        field: Some(field),
                        kind: WarningKind::UnknownField,
                    });
                }
                Some(typed)
            }
            Err(error) => {
                let path = error.path().to_string();
                self.errors.push(ConfigError {
                    origin: origin.clone(),
                    object: Some(object.clone()),
                    field: (path != ".").then_some(path),
                    kind: ConfigErrorKind::Decode(error.into_inner()),
                });
                None
            }
        }
    }
}

/// A hash of a text, the same in every run of the process.
pub fn hash_text(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

fn is_manifest(path: &Path) -> bool {
    // Follows symlinks, as a ConfigMap mount needs.
    is_manifest_name(path) && path.is_file()
}

fn is_dangling_manifest_link(path: &Path) -> bool {
    is_manifest_name(path)
        && fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
        && fs::metadata(path).is_err()
}

/// Whether a directory entry's name makes it a manifest file: `*.yaml`,
/// `*.yml` or `*.json`, not hidden. (The file watcher uses the same rule,
/// so a log or an editor's swap file beside the manifests never reloads.)
pub fn is_manifest_name(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
    let extension = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(extension, Some("yaml" | "yml" | "json"))
}

fn string_at<'a>(map: &'a Mapping, key: &str) -> Option<&'a str> {
    map.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// The object's kind and name, read before it is decoded so that even a
/// decoding error can name it.
fn peek_object(map: &Mapping, kind: &str) -> ObjectRef {
    let metadata = map.get("metadata").and_then(Value::as_mapping);
    let field = |key| metadata.and_then(|m| string_at(m, key));
    ObjectRef {
        kind: kind.to_owned(),
        namespace: field("namespace").unwrap_or("default").to_owned(),
        name: field("name").unwrap_or_default().to_owned(),
    }
}
