//! Strict reading of Keras' `config.json`: every value is read through an [`Obj`] that knows its
//! place in the document (`config.layers[3].config.dilation_rate`), so every error names it, and
//! that refuses, when finished, any key nobody read: an option kiln does not know is an error,
//! never silently dropped.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::cell::RefCell;

/// One JSON object of the config, its place, and the keys read so far.
pub(crate) struct Obj<'a> {
    map: &'a Map<String, Value>,
    /// The JSON path of this object (`config.layers[3].config`).
    pub(crate) path: String,
    /// The file, for messages (`model.keras: config.json`).
    pub(crate) file: &'a str,
    read: RefCell<Vec<&'a str>>,
}

/// An error about the value at `path` of `file`.
pub(crate) fn error_at(file: &str, path: &str, msg: impl std::fmt::Display) -> Error {
    Error::Data(format!("{file}: {path}: {msg}"))
}

impl<'a> Obj<'a> {
    /// `value` as an object at `path`, or an error saying what was there.
    pub(crate) fn new(value: &'a Value, path: impl Into<String>, file: &'a str) -> Result<Self> {
        let path = path.into();
        let map = value.as_object().ok_or_else(|| {
            error_at(
                file,
                &path,
                format!("expected an object, got {}", short(value)),
            )
        })?;
        Ok(Obj {
            map,
            path,
            file,
            read: RefCell::new(Vec::new()),
        })
    }

    /// The path of `key` inside this object.
    pub(crate) fn at(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// An error about `key` of this object.
    pub(crate) fn error(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        error_at(self.file, &self.at(key), msg)
    }

    /// An error about this object as a whole.
    pub(crate) fn error_here(&self, msg: impl std::fmt::Display) -> Error {
        error_at(self.file, &self.path, msg)
    }

    /// The value of `key`, marked as read (`None` when absent).
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        let (k, v) = self.map.get_key_value(key)?;
        self.read.borrow_mut().push(k.as_str());
        Some(v)
    }

    /// The value of `key`, which must be present.
    pub(crate) fn required(&self, key: &str) -> Result<&'a Value> {
        self.get(key)
            .ok_or_else(|| self.error_here(format!("`{key}` is missing")))
    }

    /// Marks keys as read whose values do not matter to kiln (they only describe how Keras
    /// would initialise weights that the file gives, say).
    pub(crate) fn ignore(&self, keys: &[&str]) {
        for k in keys {
            let _ = self.get(k);
        }
    }

    /// A nested object.
    pub(crate) fn obj(&self, key: &str) -> Result<Obj<'a>> {
        Obj::new(self.required(key)?, self.at(key), self.file)
    }

    /// A string.
    pub(crate) fn str(&self, key: &str) -> Result<&'a str> {
        let v = self.required(key)?;
        v.as_str()
            .ok_or_else(|| self.error(key, format!("expected a string, got {}", short(v))))
    }

    /// A bool.
    pub(crate) fn bool(&self, key: &str) -> Result<bool> {
        let v = self.required(key)?;
        v.as_bool()
            .ok_or_else(|| self.error(key, format!("expected true or false, got {}", short(v))))
    }

    /// A bool, or `default` when absent.
    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.map.contains_key(key) {
            true => self.bool(key),
            false => Ok(default),
        }
    }

    /// A finite number.
    pub(crate) fn f64(&self, key: &str) -> Result<f64> {
        let v = self.required(key)?;
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.error(key, format!("expected a finite number, got {}", short(v))))
    }

    /// A positive integer.
    pub(crate) fn positive(&self, key: &str) -> Result<usize> {
        let v = self.required(key)?;
        positive(v).ok_or_else(|| {
            self.error(
                key,
                format!("expected a positive integer, got {}", short(v)),
            )
        })
    }

    /// A list of exactly `n` positive integers, or one integer meaning all `n`.
    pub(crate) fn sizes(&self, key: &str, n: usize) -> Result<Vec<usize>> {
        let v = self.required(key)?;
        let bad = || {
            self.error(
                key,
                format!("expected {n} positive integer(s), got {}", short(v)),
            )
        };
        if let Some(x) = positive(v) {
            return Ok(vec![x; n]);
        }
        let items = v.as_array().filter(|a| a.len() == n).ok_or_else(bad)?;
        items.iter().map(|i| positive(i).ok_or_else(bad)).collect()
    }

    /// Requires `key`, if present, to hold a value kiln supports (`ok`); `what` says what kiln
    /// supports, for the message.
    pub(crate) fn expect(&self, key: &str, ok: impl Fn(&Value) -> bool, what: &str) -> Result<()> {
        match self.get(key) {
            Some(v) if !ok(v) => Err(self.error(
                key,
                format!("{} is not supported: kiln supports {what}", short(v)),
            )),
            _ => Ok(()),
        }
    }

    /// Requires `key`, if present, to be `null`.
    pub(crate) fn expect_null(&self, key: &str, what: &str) -> Result<()> {
        self.expect(key, Value::is_null, &format!("no {what} (null)"))
    }

    /// The entries nobody has read yet, now marked as read.
    pub(crate) fn rest(&self) -> Vec<(&'a String, &'a Value)> {
        let mut read = self.read.borrow_mut();
        let rest: Vec<_> = self
            .map
            .iter()
            .filter(|(k, _)| !read.contains(&k.as_str()))
            .collect();
        read.extend(rest.iter().map(|(k, _)| k.as_str()));
        rest
    }

    /// Fails on the first key nobody read: an option kiln does not know.
    pub(crate) fn finish(&self, owner: &str) -> Result<()> {
        let read = self.read.borrow();
        match self.map.keys().find(|k| !read.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => Err(self.error(
                k,
                format!("unknown option `{k}` of {owner}: kiln does not know what it means"),
            )),
        }
    }
}

fn positive(v: &Value) -> Option<usize> {
    v.as_u64()
        .filter(|x| *x > 0)
        .and_then(|x| usize::try_from(x).ok())
}

/// A value, shortened for a message.
pub(crate) fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}
