//! JSON manifests read straight into the YAML value tree the loader
//! validates, in one pass.
//!
//! Invariant: the tree is exactly what `serde_json::Value` then
//! `serde_norway::to_value` made of the same text (object keys sorted, the
//! last of a repeated key winning), so errors and unknown-field warnings
//! read as they did; only the intermediate tree, its conversion and their
//! allocations are gone.

use serde_norway::Value;

/// One JSON document, read straight into the YAML value the loader takes
/// (one pass, no `serde_json::Value` tree on the way), exactly as
/// `serde_json::Value` then `serde_norway::to_value` would make it: object
/// keys sorted, the last of a repeated key winning.
pub(super) struct JsonDocument(pub(super) Value);

impl<'de> serde::Deserialize<'de> for JsonDocument {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor).map(JsonDocument)
    }
}

struct JsonVisitor;

impl<'de> serde::de::Visitor<'de> for JsonVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(JsonDocument(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = std::collections::BTreeMap::new();
        while let Some((key, JsonDocument(value))) = map.next_entry::<String, JsonDocument>()? {
            fields.insert(key, value);
        }
        Ok(Value::Mapping(fields.into_iter().map(|(k, v)| (Value::String(k), v)).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_document_reads_as_through_serde_json_values() {
        let text = r#"{"kind": "Service", "b": [1, -2, 3.5, 18446744073709551615, true, null, "s"],
            "a": {"z": {}, "y": [], "x": "first", "x": "last"}, "e": "\u00e9\n"} [] 7 "text" null"#;
        let direct: Vec<Value> = serde_json::Deserializer::from_str(text)
            .into_iter::<JsonDocument>()
            .map(|d| d.expect("valid JSON").0)
            .collect();
        let through: Vec<Value> = serde_json::Deserializer::from_str(text)
            .into_iter::<serde_json::Value>()
            .map(|d| serde_norway::to_value(d.expect("valid JSON")).expect("converts"))
            .collect();
        assert_eq!(direct.len(), 5);
        assert_eq!(direct, through);
        // Equal mappings may differ in order: the keys come out alike too.
        let keys = |v: &Value| -> Vec<String> {
            v.as_mapping().map(|m| m.keys().map(|k| format!("{k:?}")).collect()).unwrap_or_default()
        };
        assert_eq!(keys(&direct[0]), keys(&through[0]));
        assert_eq!(keys(&direct[0]["a"]), keys(&through[0]["a"]));
        assert_eq!(direct[0]["a"]["x"], Value::String("last".into()), "the last repeated key wins");
    }
}
