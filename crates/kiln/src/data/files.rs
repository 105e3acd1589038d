//! Data from files: CSV, NPY/NPZ and IDX (the MNIST format, gzip or not).
//!
//! Every reader returns an error, never panics, for any bytes: the message names the file (and
//! the array, the row and the column where there is one) and says what to do. Nothing is
//! allocated for what a header merely claims: sizes are computed with checked arithmetic and
//! compared with the bytes really present before the data are read. Non-finite values (NaN,
//! ±infinity, or numbers beyond f32's range) are refused unless [`ReadOptions::allow_non_finite`]
//! is set.

use super::npy;
use super::Dataset;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::io::Read;
use std::path::Path;

fn data_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Data(format!("{}: {msg}", path.display()))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The default of [`ReadOptions::max_bytes`]: 16 GiB.
///
/// ```
/// assert_eq!(kiln::data::ReadOptions::default().max_bytes, kiln::data::DEFAULT_MAX_BYTES);
/// ```
pub const DEFAULT_MAX_BYTES: u64 = 16 << 30;

/// The largest ratio of uncompressed to compressed size a deflated NPZ entry may claim (deflate
/// itself cannot exceed about 1032:1); more is a damaged archive or a zip bomb.
const MAX_DEFLATE_RATIO: u64 = 1100;

/// How the file readers treat what they find. [`ReadOptions::default`] is strict: non-finite
/// values are errors, and no array may claim more than [`DEFAULT_MAX_BYTES`].
///
/// A run file's `[data]` table maps onto it: `allow_non_finite = true` there is
/// `ReadOptions::default().allow_non_finite(true)` here.
///
/// ```
/// let strict = kiln::data::ReadOptions::default();
/// assert!(!strict.allow_non_finite);
/// let lenient = kiln::data::ReadOptions::default().allow_non_finite(true).max_bytes(1 << 20);
/// assert!(lenient.allow_non_finite);
/// assert_eq!(lenient.max_bytes, 1 << 20);
/// ```
///
/// # Errors
///
/// Building options never fails; the readers given them fail as each one documents.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadOptions {
    /// Keep NaN and ±infinity (and numbers too large for f32, which become ±infinity) instead
    /// of refusing the file. Off by default: such values train silently to a NaN loss.
    pub allow_non_finite: bool,
    /// The most bytes of data one array (an NPY file, an NPZ entry, an IDX file's data) may
    /// claim in its header; a larger claim is refused before anything is allocated.
    pub max_bytes: u64,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            allow_non_finite: false,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

impl ReadOptions {
    /// Sets [`ReadOptions::allow_non_finite`].
    ///
    /// ```
    /// assert!(kiln::data::ReadOptions::default().allow_non_finite(true).allow_non_finite);
    /// ```
    pub fn allow_non_finite(mut self, allow: bool) -> Self {
        self.allow_non_finite = allow;
        self
    }

    /// Sets [`ReadOptions::max_bytes`].
    ///
    /// ```
    /// assert_eq!(kiln::data::ReadOptions::default().max_bytes(64).max_bytes, 64);
    /// ```
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }
}

fn non_finite_hint() -> &'static str {
    "fix the data, or allow non-finite values (`allow_non_finite = true` in the run file's [data] \
     table, ReadOptions::allow_non_finite in code)"
}

fn scalar_refused(what: &str) -> String {
    format!(
        "{what} a 0-d array (a scalar); a data set needs one row per sample: save it with at least \
         one axis (e.g. numpy's np.atleast_1d)"
    )
}

/// A CSV file read to f32: every column, row-major.
struct Table {
    header: Vec<String>,
    rows: usize,
    values: Vec<f32>,
}

fn read_table(path: &Path, options: &ReadOptions) -> Result<Table> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    // The line in the file where a record starts (csv's own line count skips blank lines).
    let line_at = |p: Option<&csv::Position>, fallback: usize| {
        p.map_or(fallback, |p| {
            let mut end = usize::try_from(p.byte()).map_or(bytes.len(), |b| b.min(bytes.len()));
            // csv places a record after blank lines at the first of them.
            while matches!(bytes.get(end), Some(b'\n' | b'\r')) {
                end += 1;
            }
            1 + bytes[..end].iter().filter(|&&b| b == b'\n').count()
        })
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(&bytes[..]);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| data_err(path, format!("cannot read the header row: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    if header.is_empty() || header.iter().all(String::is_empty) {
        return Err(data_err(
            path,
            "no header row: the first line must name the columns",
        ));
    }
    let (mut values, mut rows) = (Vec::new(), 0usize);
    let mut record = csv::StringRecord::new();
    loop {
        let more = reader.read_record(&mut record).map_err(|e| {
            let line = line_at(e.position(), rows + 2);
            data_err(path, format!("row {line}: {e}"))
        })?;
        if !more {
            break;
        }
        let line = line_at(record.position(), rows + 2);
        if record.len() != header.len() {
            return Err(data_err(
                path,
                format!(
                    "row {line} has {} fields, the header has {}: every row needs one value per \
                     column",
                    record.len(),
                    header.len()
                ),
            ));
        }
        for (c, field) in record.iter().enumerate() {
            let name = &header[c];
            let v: f32 = field.parse().map_err(|_| {
                let what = if field.is_empty() {
                    "is empty".to_string()
                } else {
                    format!("`{field}` is not a number")
                };
                data_err(
                    path,
                    format!("row {line}, column `{name}`: {what}: every cell must be a number"),
                )
            })?;
            if !v.is_finite() && !options.allow_non_finite {
                let what = match field.parse::<f64>() {
                    Ok(w) if w.is_finite() => {
                        format!("`{field}` is beyond what f32 holds (±3.4e38)")
                    }
                    _ => format!("`{field}` is not a finite number"),
                };
                return Err(data_err(
                    path,
                    format!("row {line}, column `{name}`: {what}: {}", non_finite_hint()),
                ));
            }
            values.push(v);
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(data_err(path, "no data rows after the header"));
    }
    Ok(Table {
        header,
        rows,
        values,
    })
}

/// The column names of a CSV file (its header row), without reading the rest: how `kiln
/// predict` and the run files' `test_path`/`validation_path` check that a file has the columns
/// the model was trained on.
///
/// ```
/// let path = std::env::temp_dir().join(format!("kiln-doc-columns-{}.csv", std::process::id()));
/// std::fs::write(&path, "a, b ,label\n1,2,0\n")?;
/// assert_eq!(kiln::data::csv_columns(&path)?, vec!["a", "b", "label"]);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be opened; [`Error::Data`] naming the file when it has no
/// header row.
pub fn csv_columns(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(std::io::BufReader::new(file));
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| data_err(path, format!("cannot read the header row: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    if header.is_empty() || header.iter().all(String::is_empty) {
        return Err(data_err(
            path,
            "no header row: the first line must name the columns",
        ));
    }
    Ok(header)
}

/// Reads a CSV file with a header row; `label_columns` (by name) are the targets, every other
/// column an input feature. Every value must be a finite number. Errors number rows by their
/// line in the file (the header is row 1; blank lines count). The same as [`load_csv_with`]
/// with [`ReadOptions::default`].
///
/// ```
/// let path = std::env::temp_dir().join(format!("kiln-doc-load-csv-{}.csv", std::process::id()));
/// std::fs::write(&path, "a,b,label\n1,2,0\n3,4,1\n")?;
/// let data = kiln::data::load_csv(&path, &["label".to_string()], &kiln::candle::Device::Cpu)?;
/// assert_eq!(data.len(), 2);
/// assert_eq!(data.inputs()[0].to_vec2::<f32>()?, vec![vec![1., 2.], vec![3., 4.]]);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be opened; [`Error::Data`] naming the file, the row and the
/// column for a missing label column, a row of the wrong length, a cell that is not a finite
/// number, or a file with no data rows.
pub fn load_csv(
    path: impl AsRef<Path>,
    label_columns: &[String],
    device: &Device,
) -> Result<Dataset> {
    let path = path.as_ref();
    load_csv_with(path, label_columns, &ReadOptions::default(), device)
}

/// [`load_csv`] with [`ReadOptions`] (e.g. to keep NaN cells).
///
/// ```
/// use kiln::data::{load_csv_with, ReadOptions};
/// let path = std::env::temp_dir().join(format!("kiln-doc-csv-with-{}.csv", std::process::id()));
/// std::fs::write(&path, "a,y\nnan,0\n1,1\n")?;
/// let device = kiln::candle::Device::Cpu;
/// let y = ["y".to_string()];
/// assert!(load_csv_with(&path, &y, &ReadOptions::default(), &device).is_err());
/// let lenient = ReadOptions::default().allow_non_finite(true);
/// assert_eq!(load_csv_with(&path, &y, &lenient, &device)?.len(), 2);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`load_csv`]; non-finite cells only when `options` refuses them.
pub fn load_csv_with(
    path: impl AsRef<Path>,
    label_columns: &[String],
    options: &ReadOptions,
    device: &Device,
) -> Result<Dataset> {
    let path = path.as_ref();
    let table = read_table(path, options)?;
    let header = &table.header;
    let mut label_index = Vec::new();
    for name in label_columns {
        let mut at = header.iter().enumerate().filter(|(_, h)| *h == name);
        let (i, _) = at.next().ok_or_else(|| {
            data_err(
                path,
                format!("no column named `{name}`; the header has {header:?}"),
            )
        })?;
        if at.next().is_some() {
            return Err(data_err(
                path,
                format!("the header has several columns named `{name}`: rename them"),
            ));
        }
        if label_index.contains(&i) {
            return Err(data_err(
                path,
                format!("label column `{name}` is given twice"),
            ));
        }
        label_index.push(i);
    }
    if label_index.len() == header.len() {
        return Err(data_err(
            path,
            "every column is a label: no input features are left",
        ));
    }
    let width = header.len();
    let features = width - label_index.len();
    let mut xs = Vec::with_capacity(table.rows * features);
    let mut ys = Vec::with_capacity(table.rows * label_index.len());
    for row in table.values.chunks_exact(width) {
        for (c, &v) in row.iter().enumerate() {
            if !label_index.contains(&c) {
                xs.push(v);
            }
        }
        ys.extend(label_index.iter().map(|&c| row[c]));
    }
    let x = Tensor::from_vec(xs, (table.rows, features), device)?;
    let y = match label_index.len() {
        1 => Tensor::from_vec(ys, table.rows, device)?,
        k => Tensor::from_vec(ys, (table.rows, k), device)?,
    };
    Dataset::new(x, y)
}

/// Reads a CSV file with a header row whose every column is an input feature (for `predict`),
/// as an f32 tensor `[rows, columns]`. The same as [`load_csv_features_with`] with
/// [`ReadOptions::default`].
///
/// ```
/// let path = std::env::temp_dir().join(format!("kiln-doc-features-{}.csv", std::process::id()));
/// std::fs::write(&path, "a,b\n1,2\n3,4\n")?;
/// let x = kiln::data::load_csv_features(&path, &kiln::candle::Device::Cpu)?;
/// assert_eq!(x.to_vec2::<f32>()?, vec![vec![1., 2.], vec![3., 4.]]);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`load_csv`]: an unreadable file, a row of the wrong length, a cell that is not a finite
/// number, no data rows.
pub fn load_csv_features(path: impl AsRef<Path>, device: &Device) -> Result<Tensor> {
    let path = path.as_ref();
    load_csv_features_with(path, &ReadOptions::default(), device)
}

/// [`load_csv_features`] with [`ReadOptions`].
///
/// ```
/// use kiln::data::{load_csv_features_with, ReadOptions};
/// let path = std::env::temp_dir().join(format!("kiln-doc-feat-with-{}.csv", std::process::id()));
/// std::fs::write(&path, "a\ninf\n")?;
/// let device = kiln::candle::Device::Cpu;
/// assert!(load_csv_features_with(&path, &ReadOptions::default(), &device).is_err());
/// let x = load_csv_features_with(&path, &ReadOptions::default().allow_non_finite(true), &device)?;
/// assert_eq!(x.to_vec2::<f32>()?, vec![vec![f32::INFINITY]]);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`load_csv_features`]; non-finite cells only when `options` refuses them.
pub fn load_csv_features_with(
    path: impl AsRef<Path>,
    options: &ReadOptions,
    device: &Device,
) -> Result<Tensor> {
    let path = path.as_ref();
    let table = read_table(path, options)?;
    let width = table.header.len();
    Ok(Tensor::from_vec(table.values, (table.rows, width), device)?)
}

/// Reads an `.npy` array as f32, with kiln's own strict reader (dtypes f2, f4, f8, i1 to i8, u1
/// to u8 and bool, either byte order, C or Fortran order). The same as [`load_npy_with`] with
/// [`ReadOptions::default`].
///
/// ```
/// // A hand-made NPY file: magic, version 1.0, the header's length (118, so that the header
/// // ends at byte 128), the dict padded with spaces and a newline, then three little-endian f4.
/// let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
/// let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
/// bytes.extend(118u16.to_le_bytes());
/// bytes.extend(format!("{dict:<117}\n").bytes());
/// for v in [1f32, 2.5, -3.] {
///     bytes.extend(v.to_le_bytes());
/// }
/// let path = std::env::temp_dir().join(format!("kiln-doc-npy-{}.npy", std::process::id()));
/// std::fs::write(&path, &bytes)?;
/// let t = kiln::data::load_npy(&path, &kiln::candle::Device::Cpu)?;
/// assert_eq!(t.to_vec1::<f32>()?, vec![1., 2.5, -3.]);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be opened or read; [`Error::Data`] naming the file for a
/// malformed header, an unsupported dtype, a size that does not match the bytes in the file, a
/// 0-d array (a data set needs rows), a claim over [`ReadOptions::max_bytes`], or a non-finite
/// value (with its index and row).
pub fn load_npy(path: impl AsRef<Path>, device: &Device) -> Result<Tensor> {
    let path = path.as_ref();
    load_npy_with(path, &ReadOptions::default(), device)
}

/// [`load_npy`] with [`ReadOptions`].
///
/// ```
/// use kiln::data::{load_npy_with, ReadOptions};
/// let path = std::env::temp_dir().join(format!("kiln-doc-npy-missing-{}.npy", std::process::id()));
/// let err = load_npy_with(&path, &ReadOptions::default(), &kiln::candle::Device::Cpu).unwrap_err();
/// assert!(err.to_string().contains("kiln-doc-npy-missing"));
/// ```
///
/// # Errors
///
/// As [`load_npy`]; non-finite values only when `options` refuses them.
pub fn load_npy_with(
    path: impl AsRef<Path>,
    options: &ReadOptions,
    device: &Device,
) -> Result<Tensor> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let array = npy::read(std::io::BufReader::new(file), len, options).map_err(|e| match e {
        npy::ReadError::Io(source) => Error::Io {
            path: path.to_path_buf(),
            source,
        },
        npy::ReadError::Format(msg) => data_err(path, msg),
    })?;
    if array.shape.is_empty() {
        return Err(data_err(path, scalar_refused("holds")));
    }
    Ok(Tensor::from_vec(array.values, array.shape, device)?)
}

/// Reads named arrays from an `.npz` archive (numpy's `savez` or `savez_compressed`) as f32, in
/// the order of `names`. The same as [`load_npz_with`] with [`ReadOptions::default`].
///
/// ```
/// use std::io::Write;
/// // An NPY file: a version-1 header padded to 128 bytes, then little-endian f4 values.
/// let npy = |shape: &str, values: &[f32]| {
///     let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
///     let mut b = b"\x93NUMPY\x01\x00".to_vec();
///     b.extend(118u16.to_le_bytes());
///     b.extend(format!("{dict:<117}\n").bytes());
///     b.extend(values.iter().flat_map(|v| v.to_le_bytes()));
///     b
/// };
/// let path = std::env::temp_dir().join(format!("kiln-doc-npz-{}.npz", std::process::id()));
/// let mut zip = zip::ZipWriter::new(std::fs::File::create(&path)?);
/// zip.start_file("x.npy", zip::write::SimpleFileOptions::default())?;
/// zip.write_all(&npy("(2,)", &[1., 2.]))?;
/// zip.start_file("y.npy", zip::write::SimpleFileOptions::default())?;
/// zip.write_all(&npy("(2,)", &[0., 1.]))?;
/// zip.finish()?;
/// let device = kiln::candle::Device::Cpu;
/// let arrays = kiln::data::load_npz(&path, &["y", "x"], &device)?;
/// assert_eq!(arrays[0].to_vec1::<f32>()?, vec![0., 1.]);
/// assert_eq!(arrays[1].to_vec1::<f32>()?, vec![1., 2.]);
/// let missing = kiln::data::load_npz(&path, &["z"], &device).unwrap_err().to_string();
/// assert!(missing.ends_with("no array named `z`; the archive has [\"x\", \"y\"]"));
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be opened; [`Error::Data`] naming the archive (and the
/// array) if it is not a zip archive, an array is missing (the message lists those it has), an
/// entry is encrypted, compressed with another method than deflate, claims an absurd size
/// (over [`ReadOptions::max_bytes`] or over 1100 times its compressed size), fails its CRC32
/// check, or holds what [`load_npy`] refuses.
pub fn load_npz(path: impl AsRef<Path>, names: &[&str], device: &Device) -> Result<Vec<Tensor>> {
    let path = path.as_ref();
    load_npz_with(path, names, &ReadOptions::default(), device)
}

/// [`load_npz`] with [`ReadOptions`].
///
/// ```
/// use kiln::data::{load_npz_with, ReadOptions};
/// let path = std::env::temp_dir().join(format!("kiln-doc-npz-{}.npz", std::process::id()));
/// std::fs::write(&path, b"not a zip archive")?;
/// let err = load_npz_with(&path, &["x"], &ReadOptions::default(), &kiln::candle::Device::Cpu)
///     .unwrap_err();
/// assert!(err.to_string().contains("not a readable NPZ"));
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`load_npz`]; non-finite values only when `options` refuses them.
pub fn load_npz_with(
    path: impl AsRef<Path>,
    names: &[&str],
    options: &ReadOptions,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        data_err(
            path,
            format!("not a readable NPZ (zip) archive: {e}: write it with numpy's savez"),
        )
    })?;
    let entries: Vec<String> = archive
        .file_names_raw()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    let mut out = Vec::with_capacity(names.len());
    for &name in names {
        let array_err = |msg: String| data_err(path, format!("array `{name}`: {msg}"));
        let with_npy = format!("{name}.npy");
        let Some(entry_name) = [&with_npy, name]
            .into_iter()
            .find(|n| entries.iter().any(|e| e == *n))
        else {
            let have: Vec<&str> = entries
                .iter()
                .map(|e| e.strip_suffix(".npy").unwrap_or(e))
                .collect();
            return Err(data_err(
                path,
                format!("no array named `{name}`; the archive has {have:?}"),
            ));
        };
        // `by_index` reads through decompression and the CRC32 check (`by_*_raw` would not).
        let mut entry = archive
            .index_for_name_raw(entry_name.as_bytes())
            .ok_or(zip::result::ZipError::FileNotFound)
            .and_then(|i| archive.by_index(i))
            .map_err(|e| array_err(format!("cannot open the entry: {e}")))?;
        if entry.encrypted() {
            return Err(array_err(
                "the entry is encrypted; save the archive without a password".into(),
            ));
        }
        let (size, compressed) = (entry.size(), entry.compressed_size());
        if size > options.max_bytes {
            return Err(array_err(format!(
                "the entry claims {size} bytes, over the limit of {} (ReadOptions::max_bytes): \
                 the archive is damaged, or raise the limit",
                options.max_bytes
            )));
        }
        match entry.compression() {
            zip::CompressionMethod::Stored if compressed != size => {
                return Err(array_err(format!(
                    "the stored entry claims {size} bytes but occupies {compressed}: the archive \
                     is damaged"
                )))
            }
            zip::CompressionMethod::Stored => {}
            zip::CompressionMethod::Deflated
                if size
                    > compressed
                        .saturating_mul(MAX_DEFLATE_RATIO)
                        .saturating_add(1024) =>
            {
                return Err(array_err(format!(
                    "the entry claims {size} bytes from {compressed} compressed, more than \
                     deflate can expand to: the archive is damaged (or a zip bomb)"
                )))
            }
            zip::CompressionMethod::Deflated => {}
            other => {
                return Err(array_err(format!(
                    "the entry is compressed with {other:?}; kiln reads stored or deflated \
                     entries (numpy's savez and savez_compressed)"
                )))
            }
        }
        let mut bytes = Vec::new();
        (&mut entry)
            .take(size.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| {
                array_err(format!(
                    "cannot read the entry: {e}: the archive is damaged (its data or checksum is \
                     wrong)"
                ))
            })?;
        if bytes.len() as u64 != size {
            return Err(array_err(format!(
                "the entry holds {} bytes, its header says {size}: the archive is damaged",
                bytes.len()
            )));
        }
        let array = npy::parse(&bytes, options).map_err(array_err)?;
        if array.shape.is_empty() {
            return Err(array_err(scalar_refused("the entry holds")));
        }
        out.push(Tensor::from_vec(array.values, array.shape, device)?);
    }
    Ok(out)
}

/// Reads an IDX file (MNIST's format), gzip-compressed or not, as f32. The same as
/// [`load_idx_with`] with [`ReadOptions::default`].
///
/// ```
/// // Two 2×2 unsigned-byte images: magic 0 0 0x08, rank 3, dims 2, 2, 2, then 8 bytes.
/// let mut bytes = vec![0u8, 0, 0x08, 3];
/// for d in [2u32, 2, 2] {
///     bytes.extend(d.to_be_bytes());
/// }
/// bytes.extend([0u8, 1, 2, 3, 4, 5, 6, 255]);
/// let path = std::env::temp_dir().join(format!("kiln-doc-idx-{}.idx", std::process::id()));
/// std::fs::write(&path, &bytes)?;
/// let t = kiln::data::load_idx(&path, &kiln::candle::Device::Cpu)?;
/// assert_eq!(t.dims(), &[2, 2, 2]);
/// assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, vec![0., 1., 2., 3., 4., 5., 6., 255.]);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be read; [`Error::Data`] naming the file for a bad magic
/// number or element type, a 0-d header, dims whose size overflows or exceeds
/// [`ReadOptions::max_bytes`], data shorter or longer than the dims say, a broken gzip stream, or
/// a non-finite float (with its index and row).
pub fn load_idx(path: impl AsRef<Path>, device: &Device) -> Result<Tensor> {
    let path = path.as_ref();
    load_idx_with(path, &ReadOptions::default(), device)
}

/// [`load_idx`] with [`ReadOptions`].
///
/// ```
/// use kiln::data::{load_idx_with, ReadOptions};
/// let path = std::env::temp_dir().join(format!("kiln-doc-idx0-{}.idx", std::process::id()));
/// std::fs::write(&path, [0u8, 0, 0x08, 0])?; // rank 0: a scalar
/// let err = load_idx_with(&path, &ReadOptions::default(), &kiln::candle::Device::Cpu).unwrap_err();
/// assert!(err.to_string().contains("0-d"));
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`load_idx`]; non-finite values only when `options` refuses them.
pub fn load_idx_with(
    path: impl AsRef<Path>,
    options: &ReadOptions,
    device: &Device,
) -> Result<Tensor> {
    let path = path.as_ref();
    let raw = std::fs::read(path).map_err(io_err(path))?;
    let (dims, values) = if raw.starts_with(&[0x1f, 0x8b]) {
        parse_idx(flate2::read::GzDecoder::new(&raw[..]), true, options)
    } else {
        parse_idx(&raw[..], false, options)
    }
    .map_err(|msg| data_err(path, msg))?;
    Ok(Tensor::from_vec(values, dims, device)?)
}

/// Parses an IDX stream: the header first, then at most the data it declares plus one byte.
pub(crate) fn parse_idx(
    mut r: impl Read,
    gzip: bool,
    options: &ReadOptions,
) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    let broken = |e: std::io::Error| {
        if gzip {
            format!("broken gzip stream: {e}: the file is damaged")
        } else {
            format!("cannot read: {e}")
        }
    };
    let mut read_up_to = |n: u64, buf: &mut Vec<u8>| -> std::result::Result<usize, String> {
        (&mut r).take(n).read_to_end(buf).map_err(broken)
    };
    let mut magic = Vec::with_capacity(4);
    read_up_to(4, &mut magic)?;
    if magic.len() < 4 || magic[0] != 0 || magic[1] != 0 {
        return Err("not an IDX file (bad magic number: it must start with two zero bytes)".into());
    }
    let (kind, rank) = (magic[2], magic[3] as usize);
    let size: usize = match kind {
        0x08 | 0x09 => 1,
        0x0B => 2,
        0x0C | 0x0D => 4,
        0x0E => 8,
        k => {
            return Err(format!(
                "unknown IDX element type 0x{k:02x} (0x08, 0x09, 0x0b, 0x0c, 0x0d and 0x0e exist)"
            ))
        }
    };
    if rank == 0 {
        return Err(
            "the IDX header has 0 dimensions (a 0-d array, a scalar); a data set needs one row \
             per sample"
                .into(),
        );
    }
    let mut dim_bytes = Vec::with_capacity(4 * rank);
    read_up_to(4 * rank as u64, &mut dim_bytes)?;
    if dim_bytes.len() < 4 * rank {
        return Err(format!(
            "truncated IDX header: rank {rank} needs {} bytes of dimensions, the file has {}",
            4 * rank,
            dim_bytes.len()
        ));
    }
    let dims: Vec<usize> = dim_bytes
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let bytes = dims
        .iter()
        .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&b| b <= options.max_bytes)
        .ok_or_else(|| {
            format!(
                "the IDX header's dims {dims:?} claim more than {} bytes of data \
                 (ReadOptions::max_bytes): the file is damaged, or raise the limit",
                options.max_bytes
            )
        })?;
    let mut body = Vec::new();
    read_up_to(bytes.saturating_add(1), &mut body)?;
    if (body.len() as u64) < bytes {
        return Err(format!(
            "truncated: dims {dims:?} need {bytes} bytes of data, the file has {}",
            body.len()
        ));
    }
    if body.len() as u64 > bytes {
        return Err(format!(
            "the file has more data than its dims {dims:?} need ({bytes} bytes): the header or \
             the file is wrong"
        ));
    }
    let values: Vec<f32> = body
        .chunks_exact(size)
        .map(|b| match kind {
            0x08 => b[0] as f32,
            0x09 => b[0] as i8 as f32,
            0x0B => i16::from_be_bytes([b[0], b[1]]) as f32,
            0x0C => i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as f32,
            0x0D => f32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            _ => f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32,
        })
        .collect();
    if matches!(kind, 0x0D | 0x0E) && !options.allow_non_finite {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            let index = npy::position(i, &dims, false);
            let b = &body[i * size..(i + 1) * size];
            let raw = if size == 8 {
                f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            } else {
                values[i] as f64
            };
            let what = if raw.is_finite() {
                format!("{raw:e}, beyond what f32 holds (±3.4e38)")
            } else {
                format!("{raw}")
            };
            return Err(format!(
                "the value at {index:?} (row {}) is {what}: {}",
                index[0],
                non_finite_hint()
            ));
        }
    }
    Ok((dims, values))
}

/// Writes predictions: `.npy` (one output) or `.csv` (a column per output unit, named
/// `<output>_<unit>`). The file is written to a temporary name, then renamed.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// let path = std::env::temp_dir().join(format!("kiln-doc-pred-{}.csv", std::process::id()));
/// let out = Tensor::new(&[[0.5f32, 1.5], [2., 3.]], &Device::Cpu)?;
/// kiln::data::write_predictions(&path, &["y".to_string()], &[out])?;
/// assert_eq!(std::fs::read_to_string(&path)?, "y_0,y_1\n0.5,1.5\n2,3\n");
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`Error::Data`] for another extension than `.csv` or `.npy`, several outputs for `.npy`, a
/// name count that differs from the output count, a 0-d output, or outputs with different row
/// counts; [`Error::Io`] if the file cannot be written.
pub fn write_predictions(
    path: impl AsRef<Path>,
    output_names: &[String],
    outputs: &[Tensor],
) -> Result<()> {
    let path = path.as_ref();
    if let Some(o) = outputs.iter().find(|o| o.rank() == 0) {
        return Err(data_err(
            path,
            format!(
                "an output is 0-d (shape {:?}): predictions need one row per sample",
                o.dims()
            ),
        ));
    }
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
            if output_names.len() != outputs.len() {
                return Err(data_err(
                    path,
                    format!(
                        "{} output names for {} outputs",
                        output_names.len(),
                        outputs.len()
                    ),
                ));
            }
            let rows = outputs.first().map_or(0, |t| t.dims()[0]);
            if let Some(o) = outputs.iter().find(|o| o.dims()[0] != rows) {
                return Err(data_err(
                    path,
                    format!(
                        "outputs have different row counts ({rows} and {}): every output needs \
                         one row per sample",
                        o.dims()[0]
                    ),
                ));
            }
            let flat: Vec<Tensor> = outputs
                .iter()
                .map(|o| {
                    Ok(o.to_dtype(DType::F32)?
                        .reshape((rows, o.elem_count() / rows.max(1)))?)
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
                let values: Vec<Vec<Vec<f32>>> = flat
                    .iter()
                    .map(|t| t.to_vec2::<f32>())
                    .collect::<candle_core::Result<_>>()?;
                for r in 0..rows {
                    let record: Vec<String> = values
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
