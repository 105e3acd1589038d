//! The `[data]` section: where samples come from, how they are prepared, and which are held
//! out. The preparation and the held-out rows are recorded in the run folder, so that
//! `evaluate` and `predict` treat data exactly as training did.

use super::fields::Fields;
use crate::data::{self, Dataset};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// What a run does to its data before the model sees it: the same on every path (training,
/// `evaluate --data`, `predict --input`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Preprocessing {
    /// Inputs are multiplied by this.
    pub(crate) scale: Option<f64>,
    /// Labels are one-hot encoded into this many classes.
    pub(crate) one_hot: Option<usize>,
    /// The label columns of CSV data.
    pub(crate) label_columns: Option<Vec<String>>,
    /// Whether NaN and infinite values in data files are accepted (`allow_non_finite`).
    #[serde(default)]
    pub(crate) allow_non_finite: bool,
}

impl Preprocessing {
    /// Reads the preparation keys of a `[data]` section (and nothing else).
    pub(crate) fn from_section(f: &Fields) -> Result<Preprocessing> {
        Ok(Preprocessing {
            scale: f.f64("scale")?,
            one_hot: f.usize("one_hot")?,
            label_columns: f.strings("label_columns")?,
            allow_non_finite: f.bool_or("allow_non_finite", false)?,
        })
    }

    /// How data files are read: strictly, unless the run opted in to non-finite values.
    pub(crate) fn read_options(&self) -> data::ReadOptions {
        data::ReadOptions::default().allow_non_finite(self.allow_non_finite)
    }

    /// The inputs as the model saw them in training.
    pub(crate) fn inputs(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.scale {
            Some(scale) => x.affine(scale, 0.0)?,
            None => x.clone(),
        })
    }

    /// A data set as the model saw it in training.
    pub(crate) fn dataset(&self, d: Dataset) -> Result<Dataset> {
        let mut d = d;
        if d.targets().len() != 1 || d.inputs().len() != 1 {
            return Err(Error::Data(format!(
                "the run's data preparation works on one input and one target; this data has \
                 {} inputs and {} targets",
                d.inputs().len(),
                d.targets().len()
            )));
        }
        if self.scale.is_some() {
            let x = self.inputs(&d.inputs()[0])?;
            d = rebuild(&d, x, d.targets()[0].clone())?;
        }
        if let Some(classes) = self.one_hot {
            let y = data::one_hot(&d.targets()[0], classes)?;
            d = rebuild(&d, d.inputs()[0].clone(), y)?;
        }
        Ok(d)
    }
}

/// The data of a run: training samples, the held-out test samples, and which rows of the
/// source those are.
pub(crate) struct Loaded {
    pub(crate) train: Dataset,
    pub(crate) test: Option<Dataset>,
    /// The source rows held out for the test split, in the order they were drawn.
    pub(crate) test_rows: Option<Vec<u32>>,
    pub(crate) preprocessing: Preprocessing,
}

/// Reads the `[data]` section: the data set, then the preparation (scaling, one-hot labels)
/// and the held-out test split, drawn with `seed` unless `test_rows` names the rows (as a run
/// folder records them).
pub(crate) fn load(
    f: &Fields,
    base: &Path,
    seed: u64,
    test_rows: Option<&[u32]>,
    device: &Device,
) -> Result<Loaded> {
    let preprocessing = Preprocessing::from_section(f)?;
    let dataset = source(f, base, seed, &preprocessing.read_options(), device)?;
    let test_split = f.f64_in_or(
        "test_split",
        0.0,
        crate::losses::config::Bounds::closed_open(0.0, 1.0),
    )?;
    f.finish()?;
    let dataset = preprocessing.dataset(dataset)?;
    let n = dataset.len();
    if test_rows.is_none() && test_split == 0.0 {
        return Ok(Loaded {
            train: dataset,
            test: None,
            test_rows: None,
            preprocessing,
        });
    }
    // The seed's shuffle of the rows: the held-out rows are its tail (unless a run folder
    // recorded them), the training rows the rest in the shuffle's order.
    let order: Vec<u32> = {
        use rand::{seq::SliceRandom, SeedableRng};
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        order
    };
    let rows: Vec<u32> = match test_rows {
        Some(rows) => {
            if let Some(bad) = rows.iter().find(|&&r| r as usize >= n) {
                return Err(f.error(format!(
                    "the run folder held out row {bad}, but the data now has {n} rows: the data \
                     changed since training"
                )));
            }
            rows.to_vec()
        }
        None => {
            let held = (n as f64 * test_split).floor() as usize;
            if held == 0 || held == n {
                return Err(f.error(format!(
                    "test_split {test_split} of {n} samples leaves an empty part: use more data \
                     or another fraction"
                )));
            }
            order[n - held..].to_vec()
        }
    };
    let held: std::collections::HashSet<u32> = rows.iter().copied().collect();
    let train_rows: Vec<u32> = order.into_iter().filter(|r| !held.contains(r)).collect();
    if train_rows.is_empty() {
        return Err(f.error("every row is held out: no training data is left"));
    }
    Ok(Loaded {
        train: dataset.select(&train_rows)?,
        test: Some(dataset.select(&rows)?),
        test_rows: Some(rows),
        preprocessing,
    })
}

fn source(
    f: &Fields,
    base: &Path,
    seed: u64,
    options: &data::ReadOptions,
    device: &Device,
) -> Result<Dataset> {
    let source = f.str("source")?.unwrap_or("digits");
    let path_of = |key: &str| -> Result<std::path::PathBuf> {
        let p = f.required_str(key)?;
        Ok(base.join(p))
    };
    Ok(match source {
        "digits" => data::digits(device)?,
        "csv" => {
            let labels = f
                .strings("label_columns")?
                .ok_or_else(|| f.error("csv data needs `label_columns`"))?;
            data::load_csv_with(&path_of("path")?, &labels, options, device)?
        }
        "npy" => {
            let x = data::load_npy_with(&path_of("x")?, options, device)?;
            let y = data::load_npy_with(&path_of("y")?, options, device)?;
            Dataset::new(x, y)?
        }
        "npz" => {
            let x_key = f.str("x")?.unwrap_or("x");
            let y_key = f.str("y")?.unwrap_or("y");
            let arrays = data::load_npz_with(&path_of("path")?, &[x_key, y_key], options, device)?;
            Dataset::new(arrays[0].clone(), arrays[1].clone())?
        }
        "idx" => {
            let images = data::load_idx_with(&path_of("images")?, options, device)?;
            let labels = data::load_idx_with(&path_of("labels")?, options, device)?;
            let n = images.dims().first().copied().unwrap_or(0);
            let flat = images.reshape((n, images.elem_count() / n.max(1)))?;
            Dataset::new(flat, labels)?
        }
        "blobs" => data::blobs(
            f.usize_or("samples", 600)?,
            f.usize_or("classes", 3)?,
            f.usize_or("features", 2)?,
            f.f64_or("imbalance", 1.0)?,
            f.usize_or("seed", seed as usize)? as u64,
            device,
        )?,
        "spirals" => data::spirals(
            f.usize_or("samples", 600)?,
            f.usize_or("classes", 2)?,
            f.f64_or("noise", 0.1)?,
            f.usize_or("seed", seed as usize)? as u64,
            device,
        )?,
        "regression" => data::regression(
            f.usize_or("samples", 500)?,
            f.usize_or("features", 4)?,
            f.f64_or("noise", 0.1)?,
            f.usize_or("seed", seed as usize)? as u64,
            device,
        )?,
        other => {
            return Err(f.error(format!(
                "unknown source `{other}`: use digits, csv, npy, npz, idx, blobs, spirals or \
                 regression"
            )))
        }
    })
}

/// Reads a data file given on the command line (`evaluate --data`) and prepares it as the run
/// prepared its training data. CSV label columns are the run's unless `labels` names others.
pub(crate) fn load_given(
    path: &Path,
    labels: Option<&[String]>,
    preprocessing: &Preprocessing,
    device: &Device,
) -> Result<Dataset> {
    let raw = match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => {
            let labels = labels
                .map(<[String]>::to_vec)
                .or_else(|| preprocessing.label_columns.clone())
                .unwrap_or_else(|| vec!["label".to_string()]);
            data::load_csv_with(path, &labels, &preprocessing.read_options(), device)?
        }
        Some("npz") => {
            let arrays =
                data::load_npz_with(path, &["x", "y"], &preprocessing.read_options(), device)?;
            Dataset::new(arrays[0].clone(), arrays[1].clone())?
        }
        _ => {
            return Err(Error::Data(format!(
                "{}: use a .csv or an .npz file (arrays x and y)",
                path.display()
            )))
        }
    };
    preprocessing.dataset(raw)
}

fn rebuild(d: &Dataset, x: Tensor, y: Tensor) -> Result<Dataset> {
    let out = Dataset::new(x, y)?;
    match d.sample_weight() {
        Some(w) => out.with_sample_weight(w.clone()),
        None => Ok(out),
    }
}
