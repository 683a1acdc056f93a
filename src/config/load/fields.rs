//! Fields a Kubernetes type ignored: the keys of a document that are gone
//! once the typed object is serialized again (a misspelt `targetPort` would
//! otherwise mean "same as port"). Keys whose value is null carry nothing
//! and are not reported.
//!
//! Serializing every object again doubles the cost of a load, so the
//! shapes of kept keys are remembered per type ([`KnownFields`]): a key path
//! with every list index as `[]`, each key length-prefixed so that no key
//! (`"a.b"`, `"x[]"`) can pass for another path. Whether a type keeps a key
//! depends only on where the key is, not on its value, so a document whose
//! non-null keys all have a remembered shape has no ignored field and is
//! not serialized again; any other is, and teaches its kept shapes. The
//! warnings are those of serializing every document again.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use serde::Serialize;
use serde_norway::Value;

/// The key shapes each type was seen to keep.
#[derive(Default)]
pub(super) struct KnownFields {
    by_type: HashMap<&'static str, HashSet<String>>,
}

impl KnownFields {
    /// Paths of mapping keys present in `input` but gone once `typed` is
    /// serialized again: the fields the Kubernetes type ignored.
    pub(super) fn unknown_fields<T: Serialize>(&mut self, input: &Value, typed: &T) -> Vec<String> {
        let known = self.by_type.entry(std::any::type_name::<T>()).or_default();
        let mut path = String::new();
        if shapes(input, &mut path, &mut |shape| known.contains(shape)) {
            return Vec::new();
        }
        let mut found = Vec::new();
        if let Ok(kept) = serde_norway::to_value(typed) {
            shapes(&kept, &mut path, &mut |shape| {
                if !known.contains(shape) {
                    known.insert(shape.to_owned());
                }
                true
            });
            diff_keys(input, &kept, String::new(), &mut found);
        }
        found
    }
}

/// Calls `each` with the shape of every non-null key of `value`, depth
/// first, until it returns false; whether it never did.
fn shapes(value: &Value, path: &mut String, each: &mut dyn FnMut(&str) -> bool) -> bool {
    let start = path.len();
    let all = match value {
        Value::Mapping(map) => map.iter().filter(|(_, v)| !v.is_null()).all(|(key, v)| {
            path.truncate(start);
            let _ = match key.as_str() {
                Some(k) => write!(path, "/{}:{k}", k.len()),
                None => {
                    let k = format!("{key:?}");
                    write!(path, "/{}:{k}", k.len())
                }
            };
            each(path) && shapes(v, path, each)
        }),
        Value::Sequence(items) => {
            path.push_str("[]");
            items.iter().all(|item| shapes(item, path, each))
        }
        Value::Tagged(tagged) => shapes(&tagged.value, path, each),
        _ => true,
    };
    path.truncate(start);
    all
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;

    use super::*;

    fn service(yaml: &str) -> (Value, Service) {
        let value: Value = serde_norway::from_str(yaml).expect("yaml");
        let typed: Service = serde_norway::from_value(value.clone()).expect("a Service");
        (value, typed)
    }

    #[test]
    fn remembered_shapes_report_exactly_what_serializing_every_document_again_reports() {
        let documents = [
            "{metadata: {name: a, labels: {app: a}}, spec: {type: ClusterIP, ports: [{port: 80, targetPort: 8080}]}}",
            // All shapes known from the first: nothing to report.
            "{metadata: {name: b, labels: {app: b}}, spec: {ports: [{port: 81}, {port: 82, targetPort: x}]}}",
            // A misspelt field under known ones is still found.
            "{metadata: {name: c}, spec: {ports: [{port: 80, targetport: 8080}]}}",
            // Keys spelt like a known path are not that path.
            "{metadata: {name: d}, spec.type: NodePort, spec: {ports: [{port: 80}], 'ports[]': 1}}",
            // A new label key (any key is kept in a map), a null unknown field.
            "{metadata: {name: e, labels: {tier: web}}, spec: {ports: [{port: 80}], bogus: null}}",
        ];
        let mut remembering = KnownFields::default();
        let mut found = Vec::new();
        for doc in documents {
            let (value, typed) = service(doc);
            let fresh = KnownFields::default().unknown_fields(&value, &typed);
            let remembered = remembering.unknown_fields(&value, &typed);
            assert_eq!(remembered, fresh, "{doc}");
            found.push(remembered);
        }
        assert!(found[0].is_empty() && found[1].is_empty() && found[4].is_empty(), "{found:?}");
        assert_eq!(found[2], ["spec.ports[0].targetport"]);
        assert_eq!(found[3], ["spec.type", "spec.ports[]"]);
    }
}
