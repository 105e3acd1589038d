//! Reading a run file's tables with the line of every value at hand, so that every error names
//! the file, the line and the key.

use crate::error::{Error, Result};
use crate::losses::config::{Bounds, ParamValue, Params};
use std::cell::RefCell;
use std::ops::Range;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The text of a run file, for turning byte offsets into line numbers.
pub(crate) struct Doc {
    pub(crate) name: String,
    pub(crate) text: String,
}

impl Doc {
    pub(crate) fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    pub(crate) fn error(&self, span: &Range<usize>, msg: impl std::fmt::Display) -> Error {
        // A saved model.json is read through a TOML rendering that keeps every value on its
        // line (run/json_lines.rs), so the line is the file's own.
        Error::InvalidArgument(format!(
            "{} line {}: {msg}",
            self.name,
            self.line(span.start)
        ))
    }
}

/// One table of the run file and the keys read from it so far.
pub(crate) struct Fields<'a, 'i> {
    pub(crate) doc: &'a Doc,
    table: &'a DeTable<'i>,
    pub(crate) span: Range<usize>,
    pub(crate) what: String,
    used: RefCell<Vec<String>>,
}

pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// A string and where it sits in the file.
pub(crate) type Located = (String, Range<usize>);

impl<'a, 'i> Fields<'a, 'i> {
    pub(crate) fn new(
        doc: &'a Doc,
        table: &'a DeTable<'i>,
        span: Range<usize>,
        what: impl Into<String>,
    ) -> Self {
        Self {
            doc,
            table,
            span,
            what: what.into(),
            used: RefCell::new(Vec::new()),
        }
    }

    /// An error about the table as a whole.
    pub(crate) fn error(&self, msg: impl std::fmt::Display) -> Error {
        self.doc.error(&self.span, format!("{}: {msg}", self.what))
    }

    /// An error about one value.
    pub(crate) fn value_error(
        &self,
        key: &str,
        value: &Value<'i>,
        msg: impl std::fmt::Display,
    ) -> Error {
        self.doc
            .error(&value.span(), format!("{} `{key}`: {msg}", self.what))
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value<'i>> {
        let v = self.table.get(key)?;
        self.used.borrow_mut().push(key.to_string());
        Some(v)
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.table.get(key).is_some()
    }

    /// A finite number, if present (TOML's `nan` and `inf` are errors).
    pub(crate) fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.f64_in(key, Bounds::finite())
    }

    /// A number in `bounds`, if present; the error names the value and the interval.
    pub(crate) fn f64_in(&self, key: &str, bounds: Bounds) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let x = number(v.get_ref()).ok_or_else(|| {
            self.value_error(
                key,
                v,
                format!(
                    "expected {bounds}, got {} ({})",
                    param_value(v.get_ref()),
                    v.get_ref().type_str()
                ),
            )
        })?;
        if !bounds.contains(x) {
            return Err(self.value_error(
                key,
                v,
                format!("expected {bounds}, got {}", param_value(v.get_ref())),
            ));
        }
        Ok(Some(x))
    }

    /// A finite number, or `default` when absent.
    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.f64(key)?.unwrap_or(default))
    }

    /// A number in `bounds`, or `default` when absent.
    pub(crate) fn f64_in_or(&self, key: &str, default: f64, bounds: Bounds) -> Result<f64> {
        Ok(self.f64_in(key, bounds)?.unwrap_or(default))
    }

    /// An integer `>= min`, if present.
    pub(crate) fn usize_min(&self, key: &str, min: usize) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        integer(v.get_ref())
            .filter(|i| *i >= 0 && *i as u64 >= min as u64)
            .map(|i| Some(i as usize))
            .ok_or_else(|| {
                self.value_error(
                    key,
                    v,
                    format!(
                        "expected an integer >= {min}, got {}",
                        param_value(v.get_ref())
                    ),
                )
            })
    }

    /// An integer `>= min`, or `default` when absent.
    pub(crate) fn usize_min_or(&self, key: &str, default: usize, min: usize) -> Result<usize> {
        Ok(self.usize_min(key, min)?.unwrap_or(default))
    }

    pub(crate) fn usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        integer(v.get_ref())
            .filter(|i| *i >= 0)
            .map(|i| Some(i as usize))
            .ok_or_else(|| {
                self.value_error(
                    key,
                    v,
                    format!(
                        "expected a non-negative integer, got {}",
                        param_value(v.get_ref())
                    ),
                )
            })
    }

    pub(crate) fn u64_or(&self, key: &str, default: u64) -> Result<u64> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        integer(v.get_ref())
            .filter(|i| *i >= 0)
            .map(|i| i as u64)
            .ok_or_else(|| self.value_error(key, v, "expected a non-negative integer"))
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize(key)?.unwrap_or(default))
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        v.get_ref()
            .as_bool()
            .ok_or_else(|| self.value_error(key, v, "expected true or false"))
    }

    pub(crate) fn str(&self, key: &str) -> Result<Option<&'a str>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.get_ref()
            .as_str()
            .map(Some)
            .ok_or_else(|| self.value_error(key, v, "expected a string"))
    }

    pub(crate) fn required_str(&self, key: &str) -> Result<&'a str> {
        self.str(key)?
            .ok_or_else(|| self.error(format!("missing key `{key}`")))
    }

    pub(crate) fn usizes(&self, key: &str) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v
            .get_ref()
            .as_array()
            .ok_or_else(|| self.value_error(key, v, "expected a list of integers"))?;
        items
            .iter()
            .map(|i| {
                integer(i.get_ref())
                    .filter(|n| *n >= 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| self.value_error(key, i, "expected a non-negative integer"))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        Ok(self
            .strings_at(key)?
            .map(|items| items.into_iter().map(|(s, _)| s).collect()))
    }

    /// Like [`Fields::strings`], with where each string sits, for errors about one of them.
    pub(crate) fn strings_at(&self, key: &str) -> Result<Option<Vec<Located>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        if let Some(s) = v.get_ref().as_str() {
            return Ok(Some(vec![(s.to_string(), v.span())]));
        }
        let items = v
            .get_ref()
            .as_array()
            .ok_or_else(|| self.value_error(key, v, "expected a string or a list of strings"))?;
        items
            .iter()
            .map(|i| {
                i.get_ref()
                    .as_str()
                    .map(|s| (s.to_string(), i.span()))
                    .ok_or_else(|| self.value_error(key, i, "expected a string"))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An error about the value at `span` under `key`.
    pub(crate) fn error_at(
        &self,
        key: &str,
        span: &Range<usize>,
        msg: impl std::fmt::Display,
    ) -> Error {
        self.doc
            .error(span, format!("{} `{key}`: {msg}", self.what))
    }

    pub(crate) fn table(&self, key: &str) -> Result<Option<Fields<'a, 'i>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let t = v
            .get_ref()
            .as_table()
            .ok_or_else(|| self.value_error(key, v, "expected a table"))?;
        Ok(Some(Fields::new(
            self.doc,
            t,
            v.span(),
            format!("{} `{key}`", self.what),
        )))
    }

    /// A list of tables (`[[key]]` or `key = [{…}, …]`).
    pub(crate) fn tables(&self, key: &str) -> Result<Vec<Fields<'a, 'i>>> {
        let Some(v) = self.get(key) else {
            return Ok(Vec::new());
        };
        let items = v
            .get_ref()
            .as_array()
            .ok_or_else(|| self.value_error(key, v, "expected a list of tables"))?;
        items
            .iter()
            .enumerate()
            .map(|(n, i)| {
                let t = i
                    .get_ref()
                    .as_table()
                    .ok_or_else(|| self.value_error(key, i, "expected a table"))?;
                Ok(Fields::new(self.doc, t, i.span(), format!("{key}[{n}]")))
            })
            .collect()
    }

    /// Every key and value of the table, in order (marks them all as read).
    pub(crate) fn entries(&self) -> Vec<(String, &'a Value<'i>)> {
        self.table
            .iter()
            .map(|(k, v)| {
                self.used.borrow_mut().push(k.get_ref().to_string());
                (k.get_ref().to_string(), v)
            })
            .collect()
    }

    /// Fails on any key that was never read: a typo must not be ignored silently.
    pub(crate) fn finish(&self) -> Result<()> {
        let used = self.used.borrow();
        let unknown: Vec<&Spanned<_>> = self
            .table
            .keys()
            .filter(|k| !used.iter().any(|u| u == k.get_ref().as_ref()))
            .collect();
        if let Some(k) = unknown.first() {
            return Err(self.doc.error(
                &k.span(),
                format!("{}: unknown key `{}`", self.what, k.get_ref()),
            ));
        }
        Ok(())
    }
}

pub(crate) fn number(v: &DeValue) -> Option<f64> {
    match v {
        DeValue::Float(f) => f.as_str().replace('_', "").parse().ok(),
        DeValue::Integer(_) => integer(v).map(|i| i as f64),
        _ => None,
    }
}

pub(crate) fn integer(v: &DeValue) -> Option<i64> {
    match v {
        DeValue::Integer(i) => i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok(),
        _ => None,
    }
}

/// A TOML value as JSON (for loss configs and model.json).
pub(crate) fn to_json(v: &DeValue) -> serde_json::Value {
    match v {
        DeValue::String(s) => serde_json::Value::String(s.to_string()),
        DeValue::Integer(_) => integer(v)
            .map(serde_json::Value::from)
            .unwrap_or(serde_json::Value::Null),
        DeValue::Float(_) => number(v)
            .map(serde_json::Value::from)
            .unwrap_or(serde_json::Value::Null),
        DeValue::Boolean(b) => serde_json::Value::Bool(*b),
        DeValue::Datetime(d) => serde_json::Value::String(d.to_string()),
        DeValue::Array(a) => {
            serde_json::Value::Array(a.iter().map(|i| to_json(i.get_ref())).collect())
        }
        DeValue::Table(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, v)| (k.get_ref().to_string(), to_json(v.get_ref())))
                .collect(),
        ),
    }
}

/// A TOML value as the parser-neutral [`ParamValue`] (for errors and the loss parser).
pub(crate) fn param_value(v: &DeValue) -> ParamValue {
    match v {
        DeValue::String(s) => ParamValue::String(s.to_string()),
        DeValue::Integer(i) => match integer(v) {
            Some(n) => ParamValue::Integer(n),
            None => ParamValue::Other(format!("{} (too large)", i.as_str())),
        },
        DeValue::Float(f) => match number(v) {
            Some(x) => ParamValue::Float(x),
            None => ParamValue::Other(f.as_str().to_string()),
        },
        DeValue::Boolean(b) => ParamValue::Bool(*b),
        DeValue::Datetime(d) => ParamValue::Other(d.to_string()),
        DeValue::Array(a) => ParamValue::List(a.iter().map(|i| param_value(i.get_ref())).collect()),
        DeValue::Table(_) => ParamValue::Table,
    }
}

/// A run-file table seen as loss (or regularizer) parameters, leaving out the keys the run file
/// itself reads (`type`, `reduction`): errors name the file and the line of the value.
pub(crate) struct TableParams<'f, 'a, 'i> {
    pub(crate) fields: &'f Fields<'a, 'i>,
    pub(crate) skip: &'f [&'f str],
}

impl Params for TableParams<'_, '_, '_> {
    fn keys(&self) -> Vec<String> {
        self.fields
            .table
            .keys()
            .map(|k| k.get_ref().to_string())
            .filter(|k| !self.skip.contains(&k.as_str()))
            .collect()
    }
    fn value(&self, key: &str) -> Option<ParamValue> {
        if self.skip.contains(&key) {
            return None;
        }
        self.fields.get(key).map(|v| param_value(v.get_ref()))
    }
    fn error(&self, key: Option<&str>, msg: &str) -> Error {
        match key {
            Some(k) => match self.fields.table.get(k) {
                Some(v) => self.fields.value_error(k, v, msg),
                None => self.fields.error(format!("`{k}`: {msg}")),
            },
            None => self.fields.error(msg),
        }
    }
}
