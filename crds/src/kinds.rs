//! Choosing a kind by naming it: `jq: '.x'`, `file: {path: out.jsonl}`, `generator: {count: 3}`.
//!
//! Each family of kinds (sources, steps, sinks) is one enum in serde's externally tagged form, so the
//! enum is the only list of them: its variants give the YAML keys, the CRD's properties and "exactly
//! one" rule, and the names in error messages, and every `match` over it is checked by the compiler.
//!
//! The object that holds the choice (a `Source`, `Stage` or `Sink`) keeps its other fields beside the
//! kind's key, as users write it, and keeps every kind it was given: a file naming two kinds, or none,
//! still parses, and `validate` reports it with the stage's path along with every other problem. The
//! holder derives serde with `#[serde(remote = "Self")]` for its own fields and hands its kinds over with
//! [`deserialize_sifted`] and [`serialize_with`]; its schema gains the kinds through [`KindsSchema`].

use std::fmt;
use std::marker::PhantomData;

use schemars::transform::Transform;
use schemars::{JsonSchema, Schema};
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{forward_to_deserialize_any, Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

/// The kinds given to one source, stage or sink; valid when there is exactly one.
#[derive(Clone, Debug, PartialEq)]
pub struct Kinds<K>(Vec<K>);

impl<K> Default for Kinds<K> {
    fn default() -> Self {
        Kinds(Vec::new())
    }
}

impl<K> From<K> for Kinds<K> {
    fn from(kind: K) -> Self {
        Kinds(vec![kind])
    }
}

impl<K> Kinds<K> {
    /// The kind, when exactly one was given.
    pub fn one(&self) -> Option<&K> {
        match self.0.as_slice() {
            [kind] => Some(kind),
            _ => None,
        }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, K> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Serialize + DeserializeOwned> Kinds<K> {
    /// The names of the kinds given, in the order the enum declares them.
    pub fn names(&self) -> Vec<&'static str> {
        let mut given: Vec<&'static str> = self.0.iter().filter_map(name_of).collect();
        let all = names::<K>();
        given.sort_by_key(|name| all.iter().position(|n| n == name));
        given
    }
}

/// Every name of a kind enum, in declaration order: `["jq", "exec", …]`.
pub fn names<K: DeserializeOwned>() -> &'static [&'static str] {
    // A derived enum hands its variant names to `deserialize_enum`; this deserializer only records them.
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not an enum"))
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = variants;
            Err(de::Error::custom("names recorded"))
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
            unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier ignored_any
        }
    }
    let mut variants: &'static [&'static str] = &[];
    let _ = K::deserialize(Probe(&mut variants));
    variants
}

/// The name one kind is written under.
pub fn name_of<K: Serialize + DeserializeOwned>(kind: &K) -> Option<&'static str> {
    let value = serde_json::to_value(kind).ok()?;
    let key = value.as_object()?.keys().next()?.clone();
    names::<K>().iter().copied().find(|name| *name == key)
}

/// `a, b or c`, for messages.
pub fn or_list(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Deserializes the holder's own fields with `fields` (its `remote = "Self"` derive) while the keys that
/// name a kind of `K` are taken aside, in the order given.
pub fn deserialize_sifted<'de, D, T, K>(
    deserializer: D,
    fields: impl for<'k> FnOnce(Sifted<'k, D, K>) -> Result<T, D::Error>,
) -> Result<(T, Kinds<K>), D::Error>
where
    D: Deserializer<'de>,
    K: DeserializeOwned,
{
    let mut kinds = Vec::new();
    let own = fields(Sifted {
        inner: deserializer,
        kinds: &mut kinds,
    })?;
    Ok((own, Kinds(kinds)))
}

/// Serializes the holder's own fields with `fields` (its `remote = "Self"` derive), then its kinds
/// under their names.
pub fn serialize_with<S, K>(
    serializer: S,
    fields: impl FnOnce(serde_json::value::Serializer) -> Result<Value, serde_json::Error>,
    kinds: &Kinds<K>,
) -> Result<S::Ok, S::Error>
where
    S: Serializer,
    K: Serialize,
{
    let mut map = match fields(serde_json::value::Serializer) {
        Ok(Value::Object(map)) => map,
        Ok(_) => Map::new(),
        Err(e) => return Err(serde::ser::Error::custom(e)),
    };
    for kind in &kinds.0 {
        match serde_json::to_value(kind) {
            Ok(Value::Object(entries)) => map.extend(entries),
            Ok(other) => {
                return Err(serde::ser::Error::custom(format!(
                    "a kind serialized as {other}, not as `name: settings`"
                )))
            }
            Err(e) => return Err(serde::ser::Error::custom(e)),
        }
    }
    map.serialize(serializer)
}

/// A deserializer that passes a struct's own fields through and keeps the kinds of `K` aside.
pub struct Sifted<'k, D, K> {
    inner: D,
    kinds: &'k mut Vec<K>,
}

impl<'de, D, K> Deserializer<'de> for Sifted<'_, D, K>
where
    D: Deserializer<'de>,
    K: DeserializeOwned,
{
    type Error = D::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let visitor = SiftVisitor {
            visitor,
            kinds: self.kinds,
            fields,
        };
        self.inner.deserialize_struct(name, fields, visitor)
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.deserialize_struct("", &[], visitor)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

struct SiftVisitor<'k, V, K> {
    visitor: V,
    kinds: &'k mut Vec<K>,
    fields: &'static [&'static str],
}

impl<'de, V, K> Visitor<'de> for SiftVisitor<'_, V, K>
where
    V: Visitor<'de>,
    K: DeserializeOwned,
{
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_map(SiftMap {
            map,
            kinds: self.kinds,
            fields: self.fields,
        })
    }
}

struct SiftMap<'k, A, K> {
    map: A,
    kinds: &'k mut Vec<K>,
    fields: &'static [&'static str],
}

impl<'de, A, K> MapAccess<'de> for SiftMap<'_, A, K>
where
    A: MapAccess<'de>,
    K: DeserializeOwned,
{
    type Error = A::Error;

    fn next_key_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, A::Error> {
        let known = KnownKey {
            fields: self.fields,
            kinds: names::<K>(),
        };
        while let Some(key) = self.map.next_key_seed(known)? {
            if !known.kinds.contains(&key.as_str()) {
                return seed.deserialize(key.into_deserializer()).map(Some);
            }
            let kind = self.map.next_value_seed(KindSeed {
                key: &key,
                kind: PhantomData::<K>,
            })?;
            self.kinds.extend(kind);
        }
        Ok(None)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.map.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

/// A key that is one of the holder's fields or one of its kinds. Checked while the key is read, so that
/// the error points at the key's line.
#[derive(Clone, Copy)]
struct KnownKey {
    fields: &'static [&'static str],
    kinds: &'static [&'static str],
}

impl<'de> DeserializeSeed<'de> for KnownKey {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, key: D) -> Result<String, D::Error> {
        key.deserialize_str(self)
    }
}

impl Visitor<'_> for KnownKey {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
        if self.fields.contains(&key) || self.kinds.contains(&key) {
            return Ok(key.to_string());
        }
        // serde's own wording, with the kinds among the fields a user may write here.
        let expected: Vec<String> = self
            .fields
            .iter()
            .chain(self.kinds)
            .map(|f| format!("`{f}`"))
            .collect();
        Err(E::custom(format_args!(
            "unknown field `{key}`, expected one of {}",
            expected.join(", ")
        )))
    }
}

/// Deserializes the value under a kind's key as that variant of `K`; `null` leaves the kind unset, as
/// it does for any optional field.
struct KindSeed<'a, K> {
    key: &'a str,
    kind: PhantomData<K>,
}

impl<'de, K: DeserializeOwned> DeserializeSeed<'de> for KindSeed<'_, K> {
    type Value = Option<K>;

    fn deserialize<D: Deserializer<'de>>(self, value: D) -> Result<Option<K>, D::Error> {
        value.deserialize_option(self)
    }
}

impl<'de, K: DeserializeOwned> Visitor<'de> for KindSeed<'_, K> {
    type Value = Option<K>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the settings of `{}`", self.key)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<K>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<K>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, value: D) -> Result<Option<K>, D::Error> {
        K::deserialize(Tagged {
            key: self.key,
            value,
        })
        .map(Some)
    }
}

/// `key: value` seen as the externally tagged enum it spells.
struct Tagged<'a, D> {
    key: &'a str,
    value: D,
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Tagged<'_, D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        visitor.visit_enum(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de, 'a, D: Deserializer<'de>> de::EnumAccess<'de> for Tagged<'a, D> {
    type Error = D::Error;
    type Variant = Payload<D>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Payload<D>), D::Error> {
        let key: de::value::StrDeserializer<'a, D::Error> = self.key.into_deserializer();
        Ok((seed.deserialize(key)?, Payload(self.value)))
    }
}

/// How the value under a kind's key is read, by the shape of the variant.
struct Payload<D>(D);

impl<'de, D: Deserializer<'de>> de::VariantAccess<'de> for Payload<D> {
    type Error = D::Error;

    fn unit_variant(self) -> Result<(), D::Error> {
        de::IgnoredAny::deserialize(self.0).map(|_| ())
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, D::Error> {
        seed.deserialize(self.0)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_struct("", fields, visitor)
    }
}

/// Adds the kinds of `K` to a holder's schema: one optional property per kind, and the rule that
/// exactly one of them (or of `also`, such as a stage's `stages`) is set.
pub struct KindsSchema<K> {
    /// "a source", "a stage", "a sink": how the rule's message names the holder.
    pub holder: &'static str,
    /// Other fields that count as a kind, with how the message names them.
    pub also: &'static [(&'static str, &'static str)],
    pub kind: PhantomData<K>,
}

impl<K: JsonSchema + DeserializeOwned> Transform for KindsSchema<K> {
    fn transform(&mut self, schema: &mut Schema) {
        let generator = schemars::generate::SchemaSettings::openapi3()
            .with(|s| {
                s.inline_subschemas = true;
                s.meta_schema = None;
            })
            .into_generator();
        let kinds = generator.into_root_schema_for::<K>();
        let variants = kinds
            .get("oneOf")
            .or_else(|| kinds.get("anyOf"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let Some(object) = schema.as_object_mut() else {
            return;
        };
        let properties = object
            .entry("properties")
            .or_insert_with(|| json!({}))
            .as_object_mut();
        let Some(properties) = properties else {
            return;
        };
        for variant in variants {
            let Some(entries) = variant.get("properties").and_then(Value::as_object) else {
                continue;
            };
            for (name, property) in entries {
                let mut property = property.clone();
                if let Some(p) = property.as_object_mut() {
                    if let Some(doc) = variant.get("description") {
                        p.entry("description").or_insert_with(|| doc.clone());
                    }
                    // Like any optional field: `null` means not given.
                    p.insert("nullable".to_string(), Value::Bool(true));
                }
                properties.insert(name.clone(), property);
            }
        }
        let fields: Vec<&str> = self
            .also
            .iter()
            .map(|(field, _)| *field)
            .chain(names::<K>().iter().copied())
            .collect();
        let labels: Vec<&str> = self
            .also
            .iter()
            .map(|(_, label)| *label)
            .chain(names::<K>().iter().copied())
            .collect();
        let count: Vec<String> = fields
            .iter()
            .map(|f| format!("(has(self.{f}) ? 1 : 0)"))
            .collect();
        let rule = json!({
            "rule": format!("{} == 1", count.join(" + ")),
            "message": format!("{} needs exactly one of {}", self.holder, labels.join(", ")),
        });
        match object
            .entry("x-kubernetes-validations")
            .or_insert_with(|| json!([]))
        {
            Value::Array(rules) => rules.push(rule),
            other => *other = json!([rule]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{ExecStep, Sink, SinkKind, Stage, StepKind};
    use crate::validate::parse_pipeline;

    #[test]
    fn names_come_from_the_enum_in_its_order() {
        assert_eq!(
            names::<SinkKind>(),
            ["file", "log", "nats", "http", "postgres"]
        );
        assert_eq!(
            name_of(&StepKind::Sleep("1s".into())),
            Some("sleep"),
            "the name a kind is written under"
        );
        assert_eq!(or_list(&["a", "b", "c"]), "a, b or c");
    }

    #[test]
    fn a_stage_reads_and_writes_its_kind_beside_its_fields() {
        let stage: Stage =
            serde_norway::from_str("name: s\nexec: {command: [cat]}\ntimeout: 5s\n").unwrap();
        assert_eq!(
            stage.step.one(),
            Some(&StepKind::Exec(ExecStep {
                command: vec!["cat".into()]
            }))
        );
        assert_eq!(stage.timeout.as_deref(), Some("5s"));
        let json = serde_json::to_value(&stage).unwrap();
        assert_eq!(
            json,
            json!({"name": "s", "timeout": "5s", "exec": {"command": ["cat"]}})
        );
        assert_eq!(serde_json::from_value::<Stage>(json).unwrap(), stage);
    }

    #[test]
    fn two_kinds_or_none_still_parse_and_null_means_not_given() {
        let sink: Sink = serde_norway::from_str("name: s\nlog: {}\nfile: {path: x}\n").unwrap();
        assert_eq!(sink.kind.names(), ["file", "log"]);
        assert_eq!(sink.kind.one(), None);
        let sink: Sink = serde_norway::from_str("name: s\nlog: null\n").unwrap();
        assert!(sink.kind.is_empty());
        let sink: Sink = serde_norway::from_str("name: s\nlog: {}\n").unwrap();
        assert_eq!(sink.kind.names(), ["log"]);
    }

    #[test]
    fn errors_inside_a_kind_keep_their_line_and_path() {
        let text = "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: p}\nspec:\n  sources: [{name: src, generator: {count: 3}}]\n  sinks: [{name: out, log: {}}]\n  stages:\n    - name: a\n      exec:\n        comand: [cat]\n";
        let err = parse_pipeline(text).unwrap_err();
        assert_eq!(err.line, Some(10), "{err}");
        assert!(err.message.contains("spec.stages[0].exec"), "{err}");
        assert!(err.message.contains("unknown field `comand`"), "{err}");
    }

    #[test]
    fn the_schema_has_a_property_per_kind_and_the_exactly_one_rule() {
        let schema = schemars::SchemaGenerator::default().into_root_schema_for::<Sink>();
        for kind in names::<SinkKind>() {
            assert!(
                schema
                    .get("properties")
                    .and_then(|p| p.get(*kind))
                    .is_some(),
                "{kind} missing from {schema:?}"
            );
        }
        let rule = &schema.get("x-kubernetes-validations").unwrap()[0];
        assert_eq!(
            rule["rule"],
            "(has(self.file) ? 1 : 0) + (has(self.log) ? 1 : 0) + (has(self.nats) ? 1 : 0) + (has(self.http) ? 1 : 0) + (has(self.postgres) ? 1 : 0) == 1"
        );
    }
}
