//! The `[data]` section: where samples come from and how they are prepared.

use super::fields::Fields;
use crate::data::{self, Dataset};
use crate::error::Result;
use candle_core::Device;
use std::path::Path;

/// Reads the `[data]` section: the data set, then the optional preparation (scaling, one-hot
/// labels) and the held-out test split.
pub(crate) fn load(
    f: &Fields,
    base: &Path,
    seed: u64,
    device: &Device,
) -> Result<(Dataset, Option<Dataset>)> {
    let source = f.str("source")?.unwrap_or("digits");
    let path_of = |key: &str| -> Result<std::path::PathBuf> {
        let p = f.required_str(key)?;
        Ok(base.join(p))
    };
    let mut dataset = match source {
        "digits" => data::digits(device)?,
        "csv" => {
            let labels = f.strings("label_columns")?.ok_or_else(|| f.error("csv data needs `label_columns`"))?;
            data::load_csv(&path_of("path")?, &labels, device)?
        }
        "npy" => {
            let x = data::load_npy(&path_of("x")?, device)?;
            let y = data::load_npy(&path_of("y")?, device)?;
            Dataset::new(x, y)?
        }
        "npz" => {
            let x_key = f.str("x")?.unwrap_or("x");
            let y_key = f.str("y")?.unwrap_or("y");
            let arrays = data::load_npz(&path_of("path")?, &[x_key, y_key], device)?;
            Dataset::new(arrays[0].clone(), arrays[1].clone())?
        }
        "idx" => {
            let images = data::load_idx(&path_of("images")?, device)?;
            let labels = data::load_idx(&path_of("labels")?, device)?;
            let n = images.dims()[0];
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
                "unknown source `{other}`: use digits, csv, npy, npz, idx, blobs, spirals or regression"
            )))
        }
    };
    if let Some(scale) = f.f64("scale")? {
        let x = dataset.inputs()[0].affine(scale, 0.0)?;
        dataset = rebuild(&dataset, x, dataset.targets()[0].clone())?;
    }
    if let Some(classes) = f.usize("one_hot")? {
        let y = data::one_hot(&dataset.targets()[0], classes)?;
        dataset = rebuild(&dataset, dataset.inputs()[0].clone(), y)?;
    }
    let test_split = f.f64_in_or(
        "test_split",
        0.0,
        crate::losses::config::Bounds::closed_open(0.0, 1.0),
    )?;
    f.finish()?;
    if test_split > 0.0 {
        let (train, test) = dataset.shuffled_split(test_split, seed)?;
        Ok((train, Some(test)))
    } else {
        Ok((dataset, None))
    }
}

fn rebuild(d: &Dataset, x: candle_core::Tensor, y: candle_core::Tensor) -> Result<Dataset> {
    let out = Dataset::new(x, y)?;
    match d.sample_weight() {
        Some(w) => out.with_sample_weight(w.clone()),
        None => Ok(out),
    }
}
