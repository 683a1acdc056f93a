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

use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use super::{
    ConfigError, ConfigErrorKind, ConfigErrors, Conversion, Manifests, ObjectRef, Warning, WarningKind,
    service_from_k8s, slice_from_endpoints, slice_from_k8s,
};
use crate::model::Origin;

/// Reads a manifest file, or every manifest file of a directory, and
/// validates each object. Fails with every error of every file.
pub fn load_path(path: &Path) -> Result<Manifests, ConfigErrors> {
    let mut collector = Collector::default();
    for file in collector.manifest_files(path) {
        let name = file.display().to_string();
        match fs::read_to_string(&file) {
            Ok(text) => collector.file(&text, &name),
            Err(source) => collector.errors.push(file_error(&name, ConfigErrorKind::Io(source))),
        }
    }
    collector.finish()
}

/// Validates one file's text; `file` names it in errors and, ending in
/// `.json`, selects the JSON parser (YAML otherwise).
pub fn parse_str(text: &str, file: &str) -> Result<Manifests, ConfigErrors> {
    let mut collector = Collector::default();
    collector.file(text, file);
    collector.finish()
}

fn file_error(file: &str, kind: ConfigErrorKind) -> ConfigError {
    ConfigError { origin: Origin(file.to_owned()), object: None, field: None, kind }
}

/// Where a document sits: `file (document 2)` or, for an item of a List,
/// `file (document 2, items[0])`.
#[derive(Clone, Copy)]
struct Place<'a> {
    file: &'a str,
    document: usize,
    item: Option<usize>,
}

impl Place<'_> {
    fn origin(self) -> Origin {
        match self.item {
            None => Origin(format!("{} (document {})", self.file, self.document)),
            Some(item) => Origin(format!("{} (document {}, items[{item}])", self.file, self.document)),
        }
    }
}

#[derive(Default)]
struct Collector {
    manifests: Manifests,
    errors: Vec<ConfigError>,
}

impl Collector {
    fn finish(self) -> Result<Manifests, ConfigErrors> {
        match ConfigErrors::from_vec(self.errors) {
            Some(errors) => Err(errors),
            None => Ok(self.manifests),
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
                Ok(_) => {}
                Err(source) => self.errors.push(file_error(&shown, ConfigErrorKind::Io(source))),
            }
        }
        files.sort();
        if files.is_empty() {
            self.warn(Warning {
                origin: Origin(shown),
                object: None,
                field: None,
                kind: WarningKind::EmptyDirectory,
            });
        }
        files
    }

    fn file(&mut self, text: &str, file: &str) {
        if file.ends_with(".json") {
            self.json_documents(text, file);
        } else {
            self.yaml_documents(text, file);
        }
    }

    fn yaml_documents(&mut self, text: &str, file: &str) {
        for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let place = Place { file, document: i + 1, item: None };
            match <Value as serde::Deserialize>::deserialize(document) {
                Ok(value) => self.document(value, place),
                Err(source) => {
                    // The parser cannot resynchronise after a syntax error:
                    // it would repeat the same error forever.
                    self.errors.push(file_error(&place.origin().0, ConfigErrorKind::Yaml(source)));
                    break;
                }
            }
        }
    }

    fn json_documents(&mut self, text: &str, file: &str) {
        let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
        for (i, document) in stream.enumerate() {
            let place = Place { file, document: i + 1, item: None };
            let value = document
                .map_err(ConfigErrorKind::Json)
                .and_then(|json| serde_yaml::to_value(json).map_err(ConfigErrorKind::Yaml));
            match value {
                Ok(value) => self.document(value, place),
                Err(kind) => {
                    self.errors.push(file_error(&place.origin().0, kind));
                    break;
                }
            }
        }
    }

    /// One document (or List item): dispatch on apiVersion/kind.
    fn document(&mut self, value: Value, place: Place<'_>) {
        let origin = place.origin();
        let Value::Mapping(map) = &value else {
            if !value.is_null() {
                self.errors.push(file_error(&origin.0, ConfigErrorKind::NotAnObject));
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
                self.errors.push(file_error(&item_place.origin().0, ConfigErrorKind::NotAnObject));
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
            self.manifests.services.push(service);
        }
    }

    fn slice(&mut self, value: Value, origin: Origin, object: ObjectRef) {
        let Some(slice) = self.decode::<EndpointSlice>(value, &origin, &object) else {
            return;
        };
        if let Some(slice) = self.accept(slice_from_k8s(&slice, origin.clone()), origin, object) {
            self.manifests.slices.push(slice);
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
            Ok(slices) => self.manifests.slices.extend(slices),
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
        let decoded: Result<T, _> = serde_path_to_error::deserialize(value.clone());
        match decoded {
            Ok(typed) => {
                for field in unknown_fields(&value, &typed) {
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

fn is_manifest(path: &Path) -> bool {
    // Follows symlinks, as a ConfigMap mount needs.
    is_manifest_name(path) && path.is_file()
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

/// Paths of mapping keys present in `input` but gone once `typed` is
/// serialized again: the fields the Kubernetes type ignored. Keys whose value
/// is null carry nothing and are not reported.
fn unknown_fields<T: Serialize>(input: &Value, typed: &T) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(kept) = serde_yaml::to_value(typed) {
        diff_keys(input, &kept, String::new(), &mut found);
    }
    found
}

fn diff_keys(input: &Value, kept: &Value, path: String, found: &mut Vec<String>) {
    match (input, kept) {
        (Value::Mapping(input), Value::Mapping(kept)) => {
            for (key, value) in input {
                let name = key.as_str().map_or_else(|| format!("{key:?}"), str::to_owned);
                let child = if path.is_empty() { name } else { format!("{path}.{name}") };
                match kept.get(key) {
                    Some(kept_value) => diff_keys(value, kept_value, child, found),
                    None if value.is_null() => {}
                    None => found.push(child),
                }
            }
        }
        (Value::Sequence(input), Value::Sequence(kept)) => {
            for (i, (value, kept_value)) in input.iter().zip(kept).enumerate() {
                diff_keys(value, kept_value, format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}
