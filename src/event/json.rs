//! Reading a body's JSON: the top-level object's fields, each kept as found (a string, or the
//! kind of any other value), before [`super`] validates them.
//!
//! A hand-written serde visitor rather than a derived `Deserialize`: the derived one quotes
//! offending values in its errors (`invalid type: string "10.0.0.1"`), accepts duplicate keys
//! silently for maps, and cannot tell "null" from "missing" the way we need.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{FieldName, Rejection};

/// Every field of a login body, by name: a body has each at most once and no other. Adding a
/// field to the body is adding it here and reading it in `validate` (mod.rs).
pub(super) const FIELDS: &[&str] = &[
    "user_id",
    "app_version",
    "device_type",
    "ip",
    "locale",
    "device_id",
];

/// The body's top-level object: each of [`FIELDS`] as found (same index), before validation.
#[derive(Default)]
pub(super) struct RawBody<'a>([Option<RawValue<'a>>; FIELDS.len()]);

impl<'a> RawBody<'a> {
    /// The field named `name`, which must be one of [`FIELDS`] (every valid body reads every
    /// field, so a misspelt name fails every test that parses one).
    pub(super) fn take(&mut self, name: &'static str) -> Option<RawValue<'a>> {
        let index = FIELDS
            .iter()
            .position(|field| *field == name)
            .unwrap_or_else(|| panic!("`{name}` is not one of event::json::FIELDS"));
        self.0[index].take()
    }
}

/// A field's JSON value, with only strings kept: anything else is a type error, and we name its
/// kind without looking inside.
pub(super) enum RawValue<'a> {
    String(Cow<'a, str>),
    Other(&'static str),
}

/// Reads `text`'s top-level object, or says why it is not one (never quoting it).
pub(super) fn read_body(text: &str) -> Result<RawBody<'_>, Rejection> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    // The visitor leaves its structured reason here: serde's error type only carries text.
    let rejection = Cell::new(None);
    let raw = deserializer
        .deserialize_any(BodyVisitor {
            rejection: &rejection,
        })
        .map_err(|error| {
            rejection
                .take()
                .unwrap_or_else(|| Rejection::NotJson(error.to_string()))
        })?;
    deserializer
        .end()
        .map_err(|e| Rejection::NotJson(e.to_string()))?;
    Ok(raw)
}

struct BodyVisitor<'r> {
    rejection: &'r Cell<Option<Rejection>>,
}

impl BodyVisitor<'_> {
    fn reject<E: de::Error>(&self, rejection: Rejection) -> E {
        let error = E::custom(&rejection);
        self.rejection.set(Some(rejection));
        error
    }
}

impl<'de> Visitor<'de> for BodyVisitor<'_> {
    type Value = RawBody<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawBody<'de>, A::Error> {
        let mut body = RawBody::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let Some(index) = FIELDS.iter().position(|field| *field == key) else {
                return Err(self.reject(Rejection::UnknownField(FieldName::new(&key))));
            };
            let slot = &mut body.0[index];
            if slot.is_some() {
                return Err(self.reject(Rejection::DuplicateField(FIELDS[index])));
            }
            *slot = Some(map.next_value::<RawValue<'de>>()?);
        }
        Ok(body)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<RawBody<'de>, A::Error> {
        Err(self.reject(Rejection::NotObject("an array")))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("a string")))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("a number")))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("a number")))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("a number")))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("a boolean")))
    }
    fn visit_unit<E: de::Error>(self) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("null")))
    }
}

impl<'de> de::Deserialize<'de> for RawValue<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawValueVisitor)
    }
}

struct RawValueVisitor;

impl<'de> Visitor<'de> for RawValueVisitor {
    type Value = RawValue<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<RawValue<'de>, E> {
        Ok(RawValue::String(Cow::Borrowed(text)))
    }
    // Strings with escapes arrive owned.
    fn visit_str<E: de::Error>(self, text: &str) -> Result<RawValue<'de>, E> {
        Ok(RawValue::String(Cow::Owned(text.to_owned())))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<RawValue<'de>, E> {
        Ok(RawValue::String(Cow::Owned(text)))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<RawValue<'de>, E> {
        Ok(RawValue::Other("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawValue<'de>, E> {
        Ok(RawValue::Other("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawValue<'de>, E> {
        Ok(RawValue::Other("a number"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<RawValue<'de>, E> {
        Ok(RawValue::Other("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<RawValue<'de>, E> {
        Ok(RawValue::Other("null"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawValue<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RawValue::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawValue<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(RawValue::Other("an object"))
    }
}
