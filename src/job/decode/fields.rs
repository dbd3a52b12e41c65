//! The field walker behind the decoder: [`Fields`] reads the typed fields of one JSON object,
//! pushing a problem with the field's path for every missing, empty or mistyped one and, at
//! [`Fields::finish`], for every key the schema did not ask for. It knows nothing of jobs.
//!
//! It never echoes a value that could be a secret: the problems name the field and the kind of
//! value found, not the value.

use serde_json::{Map, Value};

use crate::problems::Problems;
use crate::secret::Secret;

/// The keys of one JSON object, tracking which ones the schema asked for.
pub(super) struct Fields<'a> {
    path: String,
    map: &'a Map<String, Value>,
    known: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    pub(super) fn new(value: &'a Value, path: &str, p: &mut Problems) -> Option<Fields<'a>> {
        match value {
            Value::Object(map) => Some(Fields {
                path: path.to_owned(),
                map,
                known: Vec::new(),
            }),
            other => {
                p.push(path, format!("expected an object, got {}", kind_of(other)));
                None
            }
        }
    }

    pub(super) fn path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value of `key`; `null` counts as absent.
    pub(super) fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.known.push(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn opt_str(&mut self, key: &'static str, p: &mut Problems) -> Option<&'a str> {
        match self.get(key)? {
            Value::String(s) => Some(s),
            other => {
                p.push(
                    self.path(key),
                    format!("expected a string, got {}", kind_of(other)),
                );
                None
            }
        }
    }

    pub(super) fn opt_nonempty_str(
        &mut self,
        key: &'static str,
        p: &mut Problems,
    ) -> Option<&'a str> {
        self.opt_str(key, p).filter(|s| !s.is_empty())
    }

    pub(super) fn req_str(&mut self, key: &'static str, p: &mut Problems) -> Option<&'a str> {
        let present = self.map.get(key).is_some_and(|v| !v.is_null());
        match self.opt_str(key, p) {
            Some("") => {
                p.push(self.path(key), "must not be empty");
                None
            }
            Some(s) => Some(s),
            None => {
                if !present {
                    p.push(self.path(key), "required");
                }
                None
            }
        }
    }

    /// Like `opt_str`, but the value is a secret: an empty string counts as absent and a
    /// wrong type is reported without showing the value.
    pub(super) fn opt_secret(&mut self, key: &'static str, p: &mut Problems) -> Option<Secret> {
        match self.get(key)? {
            Value::String(s) if s.is_empty() => None,
            Value::String(s) => Some(Secret::new(s.clone())),
            other => {
                p.push(
                    self.path(key),
                    format!("expected a string, got {}", kind_of(other)),
                );
                None
            }
        }
    }

    pub(super) fn req_secret(&mut self, key: &'static str, p: &mut Problems) -> Option<Secret> {
        let raw = self.map.get(key);
        let secret = self.opt_secret(key, p);
        if secret.is_none() {
            match raw {
                None | Some(Value::Null) => p.push(self.path(key), "required"),
                Some(Value::String(_)) => p.push(self.path(key), "must not be empty"),
                // A wrong type was reported by opt_secret.
                Some(_) => {}
            }
        }
        secret
    }

    pub(super) fn opt_bool(&mut self, key: &'static str, p: &mut Problems) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            other => {
                p.push(
                    self.path(key),
                    format!("expected true or false, got {}", kind_of(other)),
                );
                None
            }
        }
    }

    pub(super) fn opt_u64(&mut self, key: &'static str, p: &mut Problems) -> Option<u64> {
        match self.get(key)? {
            Value::Number(n) if n.as_u64().is_some() => n.as_u64(),
            other => {
                p.push(
                    self.path(key),
                    format!("expected a whole number of seconds, got {}", kind_of(other)),
                );
                None
            }
        }
    }

    /// Reports every key the schema did not ask for.
    pub(super) fn finish(self, p: &mut Problems) {
        for key in self.map.keys() {
            if !self.known.iter().any(|k| k == key) {
                let mut expected = self.known.clone();
                expected.sort_unstable();
                expected.dedup();
                p.push(
                    self.path(key),
                    format!("unknown field; expected one of: {}", expected.join(", ")),
                );
            }
        }
    }
}

/// An optional part: `Some(None)` when it was absent, `Some(Some(v))` when given and valid,
/// `None` when given but invalid (its problems are already reported).
pub(super) fn valid_if_given<T>(part: Option<Option<T>>) -> Option<Option<T>> {
    match part {
        None => Some(None),
        Some(Some(v)) => Some(Some(v)),
        Some(None) => None,
    }
}

pub(super) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
