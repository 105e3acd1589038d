//! `model.weights.h5`, through the pure-Rust `hdf5-pure` crate: reading weights from a file that
//! may be hostile, and writing the subset Keras needs (groups, a `name` attribute, contiguous
//! float32 datasets).
//!
//! Reading follows hard links only, walking the tree one listed member at a time: a soft or
//! external link (which could point at another file) is never followed, and a weight behind one
//! is reported missing, naming the link. A dataset's declared size is checked against the file
//! before anything is allocated for it.

use crate::error::{Error, Result};
use hdf5_pure::{AttrValue, DType, FileBuilder, GroupBuilder, Layout};
use std::collections::BTreeMap;

/// A weights file held in memory.
pub(crate) struct WeightsFile {
    file: hdf5_pure::File,
    size: u64,
    /// `model.keras: model.weights.h5`, for messages.
    shown: String,
}

impl WeightsFile {
    /// Parses `bytes` (the `model.weights.h5` member).
    pub(crate) fn new(bytes: Vec<u8>, shown: String) -> Result<Self> {
        let size = bytes.len() as u64;
        let file = hdf5_pure::File::from_bytes(bytes)
            .map_err(|e| Error::Data(format!("{shown}: not a readable HDF5 file: {e}")))?;
        Ok(Self { file, size, shown })
    }

    /// The file, for messages.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    fn error(&self, path: &str, msg: impl std::fmt::Display) -> Error {
        Error::Data(format!("{}: /{path}: {msg}", self.shown))
    }

    /// A group's members cannot be listed: hdf5-pure stops at a soft or external link.
    fn unlisted(&self, path: &str, e: impl std::fmt::Display) -> Error {
        self.error(
            path,
            format!(
                "cannot be listed ({e}): kiln reads groups of datasets stored in the file itself \
                 and never follows soft or external links"
            ),
        )
    }

    /// The group at `path` (`layers/dense/vars`), reached through hard links only; `None` when
    /// some part of the path is not there.
    fn group(&self, path: &str) -> Result<Option<hdf5_pure::Group>> {
        let mut group = self.file.root();
        let mut here = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let members = group.groups().map_err(|e| self.unlisted(&here, e))?;
            if !members.iter().any(|m| m == part) {
                return Ok(None);
            }
            if !here.is_empty() {
                here.push('/');
            }
            here.push_str(part);
            group = group
                .group(part)
                .map_err(|e| self.error(&here, format!("cannot be read: {e}")))?;
        }
        Ok(Some(group))
    }

    /// The strings of attribute `name` on the group at `path` (`""`: the root), reached through
    /// hard links only; `None` when the group or the attribute is absent. A one-string
    /// attribute reads as one element.
    pub(crate) fn attr_strings(&self, path: &str, name: &str) -> Result<Option<Vec<String>>> {
        let Some(group) = self.group(path)? else {
            return Ok(None);
        };
        let attrs = group
            .attrs()
            .map_err(|e| self.error(path, format!("attributes cannot be read: {e}")))?;
        let Some(v) = attrs.get(name) else {
            return Ok(None);
        };
        v.as_strings().map(|s| Some(s.to_vec())).ok_or_else(|| {
            self.error(
                path,
                format!("attribute `{name}` is not a string or a list of strings"),
            )
        })
    }

    /// The names of the datasets stored in the group at `path` (none when it is absent).
    pub(crate) fn dataset_names(&self, path: &str) -> Result<Vec<String>> {
        match self.group(path)? {
            None => Ok(Vec::new()),
            Some(g) => g.datasets().map_err(|e| self.unlisted(path, e)),
        }
    }

    /// The float32 values of dataset `name` in the group at `path`, which must have `shape`;
    /// `weight` names the kiln weight it becomes, for messages.
    pub(crate) fn read(
        &self,
        path: &str,
        name: &str,
        shape: &[usize],
        weight: &str,
    ) -> Result<Vec<f32>> {
        let full = format!("{path}/{name}");
        let group = self.group(path)?;
        let listed = match &group {
            Some(g) => g.datasets().map_err(|e| self.unlisted(path, e))?,
            None => Vec::new(),
        };
        let Some(group) = group.filter(|_| listed.iter().any(|n| n == name)) else {
            return Err(self.error(
                &full,
                format!(
                    "weight `{weight}` is not stored in the file (kiln reads datasets stored in \
                     the file itself and never follows soft or external links)"
                ),
            ));
        };
        let ds = group
            .dataset(name)
            .map_err(|e| self.error(&full, format!("cannot be read: {e}")))?;
        let declared: Vec<u64> = ds
            .shape()
            .map_err(|e| self.error(&full, format!("has no readable shape: {e}")))?;
        let expected: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        if declared != expected {
            return Err(self.error(
                &full,
                format!(
                    "weight `{weight}` has shape {declared:?} in the file but {shape:?} in the \
                     model described by config.json"
                ),
            ));
        }
        let dtype = ds
            .dtype()
            .map_err(|e| self.error(&full, format!("has no readable type: {e}")))?;
        // Integers are counters (Normalization's `count`), read as floats as Keras casts them.
        let width = match dtype {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
            other => {
                return Err(self.error(
                    &full,
                    format!(
                        "weight `{weight}` is stored as {other:?}; kiln reads float32, float64, \
                         and 32- or 64-bit integers"
                    ),
                ))
            }
        };
        let count = declared.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let bytes = count.and_then(|c| c.checked_mul(width));
        let layout = ds
            .layout()
            .map_err(|e| self.error(&full, format!("has no readable layout: {e}")))?;
        let fits = match (bytes, layout) {
            (Some(b), Layout::Contiguous { address, size }) => {
                // Unallocated storage (no address) would be read as fill values of any size.
                size == b
                    && address
                        .is_some_and(|a| a.checked_add(size).is_some_and(|end| end <= self.size))
            }
            (Some(b), Layout::Compact { size }) => size == b && size <= self.size,
            (_, Layout::Chunked { .. }) => return Err(self.error(
                &full,
                "is chunked (compressed or resizable); kiln reads weights stored contiguously, \
                     as Keras writes them",
            )),
            (_, Layout::Virtual) => {
                return Err(self.error(&full, "is a virtual dataset made of other files: refused"))
            }
            _ => false,
        };
        if !fits {
            return Err(self.error(
                &full,
                format!(
                    "declares {} bytes of data that the file ({} bytes) does not hold: refused \
                     before allocating",
                    bytes.map_or("more".to_string(), |b| b.to_string()),
                    self.size
                ),
            ));
        }
        ds.read_f32()
            .map_err(|e| self.error(&full, format!("cannot be read: {e}")))
    }
}

/// A tree of groups and float32 datasets, written as an HDF5 file that h5py and Keras read.
#[derive(Default)]
pub(crate) struct Tree {
    groups: BTreeMap<String, Tree>,
    datasets: Vec<(String, Vec<usize>, Vec<f32>)>,
    name: Option<String>,
}

impl Tree {
    /// The group at `path` below this one, created as needed.
    pub(crate) fn group(&mut self, path: &str) -> &mut Tree {
        let mut t = self;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            t = t.groups.entry(part.to_string()).or_default();
        }
        t
    }

    /// Sets the `name` attribute Keras writes on a `vars` group.
    pub(crate) fn set_name(&mut self, name: &str) {
        self.name = Some(name.to_string());
    }

    /// Adds a dataset.
    pub(crate) fn dataset(&mut self, name: &str, shape: Vec<usize>, values: Vec<f32>) {
        self.datasets.push((name.to_string(), shape, values));
    }

    fn fill(&self, g: &mut GroupBuilder) {
        if let Some(n) = &self.name {
            g.set_attr("name", AttrValue::String(n.clone()));
        }
        for (name, shape, values) in &self.datasets {
            let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            g.create_dataset(name)
                .with_f32_data(values)
                .with_shape(&shape);
        }
        for (name, child) in &self.groups {
            let mut c = g.create_group(name);
            child.fill(&mut c);
            g.add_group(c.finish());
        }
    }

    /// The HDF5 file's bytes.
    pub(crate) fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut b = FileBuilder::new();
        for (name, shape, values) in &self.datasets {
            let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            b.create_dataset(name)
                .with_f32_data(values)
                .with_shape(&shape);
        }
        for (name, child) in &self.groups {
            let mut c = b.create_group(name);
            child.fill(&mut c);
            b.add_group(c.finish());
        }
        b.finish()
            .map_err(|e| Error::Data(format!("cannot write the weights as HDF5: {e}")))
    }
}
