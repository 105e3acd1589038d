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
    /// Whether the model standardizes its input (`standardize = true`): a `Normalization`
    /// layer named `standardize`, adapted on the training rows, whose statistics are saved
    /// with the weights.
    #[serde(default)]
    pub(crate) standardize: bool,
    /// The input columns of CSV training data, in the order the model reads them (recorded so
    /// that `predict` can check, and reorder, the columns of its input).
    #[serde(default)]
    pub(crate) feature_columns: Option<Vec<String>>,
}

impl Preprocessing {
    /// Reads the preparation keys of a `[data]` section (and nothing else).
    pub(crate) fn from_section(f: &Fields) -> Result<Preprocessing> {
        Ok(Preprocessing {
            scale: f.f64("scale")?,
            one_hot: f.usize("one_hot")?,
            label_columns: f.strings("label_columns")?,
            allow_non_finite: f.bool_or("allow_non_finite", false)?,
            standardize: f.bool_or("standardize", false)?,
            feature_columns: None,
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
    /// The validation data of `validation_path`.
    pub(crate) validation: Option<Dataset>,
    /// The source rows held out for the test split, in the order they were drawn.
    pub(crate) test_rows: Option<Vec<u32>>,
    pub(crate) preprocessing: Preprocessing,
}

/// Reads the `[data]` section: the data set, then the preparation (scaling, one-hot labels)
/// and the held-out test data: the file of `test_path`, or the `test_split` drawn with `seed`
/// unless `test_rows` names the rows (as a run folder records them); and the validation file
/// of `validation_path`.
pub(crate) fn load(
    f: &Fields,
    base: &Path,
    seed: u64,
    test_rows: Option<&[u32]>,
    device: &Device,
) -> Result<Loaded> {
    let mut preprocessing = Preprocessing::from_section(f)?;
    let options = preprocessing.read_options();
    let kind = f.str("source")?.unwrap_or("digits");
    for key in ["test_path", "validation_path"] {
        if let (Some(v), false) = (f.get(key), matches!(kind, "csv" | "npz")) {
            return Err(f.value_error(
                key,
                v,
                format!(
                    "`{key}` names one file per split, which works with source \"csv\" or \
                     \"npz\", not \"{kind}\""
                ),
            ));
        }
    }
    let (dataset, columns) = source(f, base, seed, &options, device)?;
    let test_split = f.f64_in_or(
        "test_split",
        0.0,
        crate::losses::config::Bounds::closed_open(0.0, 1.0),
    )?;
    if let (Some(v), true) = (f.get("test_path"), f.has("test_split")) {
        return Err(f.value_error(
            "test_path",
            v,
            "test_path and test_split both say which rows are held out for the test: give one \
             of them",
        ));
    }
    let test_file = split_file(f, "test_path", base, &columns, &dataset, &options, device)?;
    let validation = split_file(
        f,
        "validation_path",
        base,
        &columns,
        &dataset,
        &options,
        device,
    )?;
    f.finish()?;
    preprocessing.feature_columns = columns.map(|c| c.features);
    let dataset = preprocessing.dataset(dataset)?;
    let validation = validation.map(|d| preprocessing.dataset(d)).transpose()?;
    if let Some(test) = test_file {
        return Ok(Loaded {
            train: dataset,
            test: Some(preprocessing.dataset(test)?),
            validation,
            test_rows: None,
            preprocessing,
        });
    }
    let n = dataset.len();
    if test_rows.is_none() && test_split == 0.0 {
        return Ok(Loaded {
            train: dataset,
            test: None,
            validation,
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
        validation,
        test_rows: Some(rows),
        preprocessing,
    })
}

/// The columns of CSV data: the header as the file has it, and the input features (the header
/// without the label columns, in the file's order).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Columns {
    header: Vec<String>,
    features: Vec<String>,
}

impl Columns {
    fn of(path: &Path, labels: &[String]) -> Result<Columns> {
        let header = data::csv_columns(path)?;
        let features = header
            .iter()
            .filter(|h| !labels.contains(h))
            .cloned()
            .collect();
        Ok(Columns { header, features })
    }
}

/// The data of `test_path` or `validation_path`: read as `path` is (same source, label columns
/// and read options), with the same columns in the same order (CSV) or the same sample shapes
/// (NPZ), else an error naming the file and the column.
fn split_file(
    f: &Fields,
    key: &str,
    base: &Path,
    columns: &Option<Columns>,
    main: &Dataset,
    options: &data::ReadOptions,
    device: &Device,
) -> Result<Option<Dataset>> {
    let Some(v) = f.get(key) else {
        return Ok(None);
    };
    let rel = v
        .get_ref()
        .as_str()
        .ok_or_else(|| f.value_error(key, v, "expected a file path (a string)"))?;
    let path = base.join(rel);
    let source = f.str("source")?.unwrap_or("digits");
    let d = match source {
        "csv" => {
            let labels = f.strings("label_columns")?.unwrap_or_default();
            let main_columns = columns.as_ref().expect("csv data has columns");
            let own = Columns::of(&path, &labels)?;
            if own.header != main_columns.header {
                let train = f.str("path")?.unwrap_or("");
                return Err(f.value_error(
                    key,
                    v,
                    column_difference(&path, train, main_columns, &own),
                ));
            }
            data::load_csv_with(&path, &labels, options, device)?
        }
        "npz" => {
            let x_key = f.str("x")?.unwrap_or("x");
            let y_key = f.str("y")?.unwrap_or("y");
            let arrays = data::load_npz_with(&path, &[x_key, y_key], options, device)?;
            let d = Dataset::new(arrays[0].clone(), arrays[1].clone())?;
            for (what, own, theirs) in [
                (x_key, d.inputs()[0].dims(), main.inputs()[0].dims()),
                (y_key, d.targets()[0].dims(), main.targets()[0].dims()),
            ] {
                if own[1..] != theirs[1..] {
                    return Err(f.value_error(
                        key,
                        v,
                        format!(
                            "{}: array `{what}` holds samples of shape {:?}, but the training \
                             data's are {:?}: every split needs the same shapes",
                            path.display(),
                            &own[1..],
                            &theirs[1..]
                        ),
                    ));
                }
            }
            d
        }
        other => {
            return Err(f.value_error(
                key,
                v,
                format!("works with source \"csv\" or \"npz\", not \"{other}\""),
            ))
        }
    };
    Ok(Some(d))
}

/// Where the header of `path` first differs from the training file's, in words.
fn column_difference(path: &Path, train: &str, main: &Columns, own: &Columns) -> String {
    let file = path.display();
    let missing: Vec<&String> = main
        .header
        .iter()
        .filter(|c| !own.header.contains(c))
        .collect();
    let extra: Vec<&String> = own
        .header
        .iter()
        .filter(|c| !main.header.contains(c))
        .collect();
    if let Some(c) = missing.first() {
        return format!(
            "{file} has no column `{c}`, which the training file {train} has: every split needs \
             the same columns (the training file has {:?})",
            main.header
        );
    }
    if let Some(c) = extra.first() {
        return format!(
            "{file} has a column `{c}` that the training file {train} does not have: every \
             split needs the same columns (the training file has {:?})",
            main.header
        );
    }
    let at = main
        .header
        .iter()
        .zip(&own.header)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    format!(
        "{file} has its columns in another order than the training file {train}: column {} is \
         `{}` there and `{}` here; write the columns in the same order ({:?})",
        at + 1,
        main.header[at],
        own.header[at],
        main.header
    )
}

/// The data set of `source`, with its columns when it is CSV.
fn source(
    f: &Fields,
    base: &Path,
    seed: u64,
    options: &data::ReadOptions,
    device: &Device,
) -> Result<(Dataset, Option<Columns>)> {
    let source = f.str("source")?.unwrap_or("digits");
    let path_of = |key: &str| -> Result<std::path::PathBuf> {
        let p = f.required_str(key)?;
        Ok(base.join(p))
    };
    if source == "csv" {
        let labels = f
            .strings("label_columns")?
            .ok_or_else(|| f.error("csv data needs `label_columns`"))?;
        let path = path_of("path")?;
        let d = data::load_csv_with(&path, &labels, options, device)?;
        return Ok((d, Some(Columns::of(&path, &labels)?)));
    }
    Ok((
        match source {
            "digits" => data::digits(device)?,
            "npy" => {
                let x = data::load_npy_with(&path_of("x")?, options, device)?;
                let y = data::load_npy_with(&path_of("y")?, options, device)?;
                Dataset::new(x, y)?
            }
            "npz" => {
                let x_key = f.str("x")?.unwrap_or("x");
                let y_key = f.str("y")?.unwrap_or("y");
                let arrays =
                    data::load_npz_with(path_of("path")?, &[x_key, y_key], options, device)?;
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
        },
        None,
    ))
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

/// Reads the input file of `kiln predict` (CSV or NPY) as the model expects it, with the notes
/// to show the person. A CSV is read by column name when the run recorded its feature columns:
/// label columns still in the file are dropped (with a note: the names say unambiguously which
/// columns they are, and a user predicting on a held-out file expects predictions, not an
/// error), columns in another order are taken in the training order, and a missing or unknown
/// column is an error naming it. Without recorded names, or for NPY (whose columns have no
/// names), a width that does not match is an error that says what is wrong.
pub(crate) fn predict_inputs(
    path: &Path,
    prep: &Preprocessing,
    expected: &[usize],
    device: &Device,
) -> Result<(Tensor, Vec<String>)> {
    let options = prep.read_options();
    let file = path.display();
    let labels = prep.label_columns.clone().unwrap_or_default();
    let mut notes = Vec::new();
    let x = match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => {
            let x = data::load_npy_with(path, &options, device)?;
            if x.rank() == 2 && expected.len() == 1 && x.dims()[1] > expected[0] {
                let more = x.dims()[1] - expected[0];
                return Err(Error::Data(format!(
                    "{file}: samples have {} columns, the model reads {} features: {more} more \
                     than the features{}; an .npy has no column names, so kiln cannot tell which \
                     to drop: save the features alone",
                    x.dims()[1],
                    expected[0],
                    match labels.len() {
                        0 => String::new(),
                        n if n == more => {
                            format!(", as many as the label columns {labels:?}: does the array still carry them?")
                        }
                        _ => String::new(),
                    }
                )));
            }
            x
        }
        Some("csv") => {
            let header = data::csv_columns(path)?;
            let all = data::load_csv_features_with(path, &options, device)?;
            let wanted: Vec<String> = match &prep.feature_columns {
                Some(f) => f.clone(),
                // No recorded names: the label columns (by name) are all kiln can drop.
                None => header
                    .iter()
                    .filter(|h| !labels.contains(h))
                    .cloned()
                    .collect(),
            };
            if header == wanted {
                all
            } else {
                if let Some(c) = wanted.iter().find(|c| !header.contains(c)) {
                    return Err(Error::Data(format!(
                        "{file} has no column `{c}`, which the model was trained on: give every \
                         feature column ({wanted:?})"
                    )));
                }
                let extra: Vec<&String> = header.iter().filter(|h| !wanted.contains(h)).collect();
                let (dropped, unknown): (Vec<&String>, Vec<&String>) =
                    extra.into_iter().partition(|h| labels.contains(h));
                if let Some(c) = unknown.first() {
                    return Err(Error::Data(format!(
                        "{file} has a column `{c}` the model was not trained on: the model reads \
                         the columns {wanted:?}; remove the others"
                    )));
                }
                if !dropped.is_empty() {
                    notes.push(format!(
                        "{file} still has the label column{} {}: ignored; the model reads its {} \
                         feature columns",
                        if dropped.len() == 1 { "" } else { "s" },
                        dropped
                            .iter()
                            .map(|c| format!("`{c}`"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        wanted.len()
                    ));
                }
                let kept: Vec<&String> = header.iter().filter(|h| wanted.contains(h)).collect();
                if kept.iter().zip(&wanted).any(|(a, b)| *a != b) {
                    notes.push(format!(
                        "{file} has the feature columns in another order than training: read by \
                         name, in the training order"
                    ));
                }
                let index: Vec<u32> = wanted
                    .iter()
                    .map(|w| header.iter().position(|h| h == w).expect("checked") as u32)
                    .collect();
                let index = Tensor::from_vec(index, wanted.len(), device)?;
                all.index_select(&index, 1)?
            }
        }
        _ => return Err(Error::Data(format!("{file}: inputs must be .csv or .npy"))),
    };
    if expected.len() == 1 && x.rank() == 2 && x.dims()[1] != expected[0] {
        return Err(Error::Data(format!(
            "{file}: rows have {} values, the model reads {} features{}",
            x.dims()[1],
            expected[0],
            match labels.is_empty() {
                true => String::new(),
                false => format!(" (label columns {labels:?}, which predict drops by name)"),
            }
        )));
    }
    Ok((prep.inputs(&x)?, notes))
}

fn rebuild(d: &Dataset, x: Tensor, y: Tensor) -> Result<Dataset> {
    let out = Dataset::new(x, y)?;
    match d.sample_weight() {
        Some(w) => out.with_sample_weight(w.clone()),
        None => Ok(out),
    }
}
