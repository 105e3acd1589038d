//! Data from files: CSV, NPY/NPZ and IDX (the MNIST format, gzip or not). Errors name the file
//! and, for text, the row.

use super::Dataset;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::io::Read;
use std::path::Path;

fn data_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Data(format!("{}: {msg}", path.display()))
}

/// Reads a CSV file with a header row; `label_columns` (by name) are the targets, every other
/// column an input feature. Every value must be a number.
///
/// ```no_run
/// let data = kiln::data::load_csv("iris.csv".as_ref(), &["species".to_string()], &candle_core::Device::Cpu)?;
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn load_csv(path: &Path, label_columns: &[String], device: &Device) -> Result<Dataset> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| data_err(path, e))?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| data_err(path, e))?
        .iter()
        .map(str::to_string)
        .collect();
    let mut label_index = Vec::new();
    for name in label_columns {
        let i = header.iter().position(|h| h == name).ok_or_else(|| {
            data_err(
                path,
                format!("no column named `{name}`; the header has {header:?}"),
            )
        })?;
        label_index.push(i);
    }
    if label_index.len() == header.len() {
        return Err(data_err(
            path,
            "every column is a label: no input features are left",
        ));
    }
    let (mut xs, mut ys, mut rows) = (Vec::new(), Vec::new(), 0usize);
    for (r, record) in reader.records().enumerate() {
        let line = r + 2; // 1-based, after the header
        let record = record.map_err(|e| data_err(path, format!("row {line}: {e}")))?;
        if record.len() != header.len() {
            return Err(data_err(
                path,
                format!(
                    "row {line} has {} fields, the header has {}",
                    record.len(),
                    header.len()
                ),
            ));
        }
        for (c, field) in record.iter().enumerate() {
            let v: f32 = field.parse().map_err(|_| {
                data_err(
                    path,
                    format!(
                        "row {line}, column `{}`: `{field}` is not a number",
                        header[c]
                    ),
                )
            })?;
            if label_index.contains(&c) {
                ys.push(v);
            } else {
                xs.push(v);
            }
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(data_err(path, "no data rows"));
    }
    let features = header.len() - label_index.len();
    let x = Tensor::from_vec(xs, (rows, features), device)?;
    let y = if label_index.len() == 1 {
        Tensor::from_vec(ys, rows, device)?
    } else {
        Tensor::from_vec(ys, (rows, label_index.len()), device)?
    };
    Dataset::new(x, y)
}

/// Reads an `.npy` array as f32.
pub fn load_npy(path: &Path, device: &Device) -> Result<Tensor> {
    let t =
        Tensor::read_npy(path).map_err(|e| data_err(path, format!("cannot read as NPY: {e}")))?;
    Ok(t.to_dtype(DType::F32)?.to_device(device)?)
}

/// Reads named arrays from an `.npz` archive as f32.
pub fn load_npz(path: &Path, names: &[&str], device: &Device) -> Result<Vec<Tensor>> {
    let found = Tensor::read_npz_by_name(path, names)
        .map_err(|e| data_err(path, format!("cannot read arrays {names:?} as NPZ: {e}")))?;
    found
        .into_iter()
        .map(|t| Ok(t.to_dtype(DType::F32)?.to_device(device)?))
        .collect()
}

/// Reads an IDX file (MNIST's format), gzip-compressed or not, as f32.
pub fn load_idx(path: &Path, device: &Device) -> Result<Tensor> {
    let raw = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| data_err(path, format!("broken gzip stream: {e}")))?;
        out
    } else {
        raw
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(data_err(path, "not an IDX file (bad magic number)"));
    }
    let (kind, rank) = (bytes[2], bytes[3] as usize);
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(data_err(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let count: usize = dims.iter().product();
    let size = match kind {
        0x08 | 0x09 => 1,
        0x0B => 2,
        0x0C | 0x0D => 4,
        0x0E => 8,
        k => {
            return Err(data_err(
                path,
                format!("unknown IDX element type 0x{k:02x}"),
            ))
        }
    };
    let body = &bytes[header..];
    if body.len() < count * size {
        return Err(data_err(
            path,
            format!(
                "truncated: {dims:?} needs {} bytes of data, the file has {}",
                count * size,
                body.len()
            ),
        ));
    }
    let values: Vec<f32> = (0..count)
        .map(|i| {
            let b = &body[i * size..(i + 1) * size];
            match kind {
                0x08 => b[0] as f32,
                0x09 => b[0] as i8 as f32,
                0x0B => i16::from_be_bytes([b[0], b[1]]) as f32,
                0x0C => i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as f32,
                0x0D => f32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                _ => f64::from_be_bytes(b.try_into().expect("8 bytes")) as f32,
            }
        })
        .collect();
    Ok(Tensor::from_vec(values, dims, device)?)
}

/// Reads a CSV file with a header row whose every column is an input feature (for `predict`).
pub fn load_csv_features(path: &Path, device: &Device) -> Result<Tensor> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| data_err(path, e))?;
    let width = reader.headers().map_err(|e| data_err(path, e))?.len();
    let (mut values, mut rows) = (Vec::new(), 0usize);
    for (r, record) in reader.records().enumerate() {
        let line = r + 2;
        let record = record.map_err(|e| data_err(path, format!("row {line}: {e}")))?;
        if record.len() != width {
            return Err(data_err(
                path,
                format!(
                    "row {line} has {} fields, the header has {width}",
                    record.len()
                ),
            ));
        }
        for (c, field) in record.iter().enumerate() {
            values.push(field.parse::<f32>().map_err(|_| {
                data_err(
                    path,
                    format!("row {line}, column {}: `{field}` is not a number", c + 1),
                )
            })?);
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(data_err(path, "no data rows"));
    }
    Ok(Tensor::from_vec(values, (rows, width), device)?)
}

/// Writes predictions: `.npy` (one output) or `.csv` (a column per output unit, named
/// `<output>_<unit>`). The file is written to a temporary name, then renamed.
pub fn write_predictions(path: &Path, output_names: &[String], outputs: &[Tensor]) -> Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => {
            let [single] = outputs else {
                return Err(data_err(
                    path,
                    "an .npy file holds one output: write several outputs as .csv",
                ));
            };
            crate::io::write_atomically(path, |tmp| {
                Ok(single.to_dtype(DType::F32)?.write_npy(tmp)?)
            })
        }
        Some("csv") => {
            let flat: Vec<Tensor> = outputs
                .iter()
                .map(|o| {
                    let n = o.dims()[0];
                    Ok(o.to_dtype(DType::F32)?
                        .reshape((n, o.elem_count() / n.max(1)))?)
                })
                .collect::<Result<_>>()?;
            crate::io::write_atomically(path, |tmp| {
                let io = |e: csv::Error| data_err(path, e);
                let mut w = csv::Writer::from_path(tmp).map_err(io)?;
                let mut header = Vec::new();
                for (name, t) in output_names.iter().zip(&flat) {
                    header.extend((0..t.dims()[1]).map(|i| format!("{name}_{i}")));
                }
                w.write_record(&header).map_err(io)?;
                let rows: Vec<Vec<Vec<f32>>> = flat
                    .iter()
                    .map(|t| t.to_vec2::<f32>())
                    .collect::<candle_core::Result<_>>()?;
                for r in 0..flat.first().map_or(0, |t| t.dims()[0]) {
                    let record: Vec<String> = rows
                        .iter()
                        .flat_map(|o| o[r].iter().map(|v| v.to_string()))
                        .collect();
                    w.write_record(&record).map_err(io)?;
                }
                w.flush().map_err(|source| Error::Io {
                    path: path.to_path_buf(),
                    source,
                })
            })
        }
        _ => Err(data_err(path, "predictions are written as .csv or .npy")),
    }
}
