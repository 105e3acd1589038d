//! The `.keras` file itself: a zip of `config.json`, `metadata.json` and `model.weights.h5`,
//! read with bounded decompression and written whole or not at all.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::path::Path;

/// A member may expand to at most this many times its stored size once it is larger than
/// [`BOMB_FLOOR`]: a zip bomb is refused before anything is decompressed.
const MAX_EXPANSION: u64 = 100;
/// Members up to this size are read whatever their compression ratio.
const BOMB_FLOOR: u64 = 64 << 20;
/// The largest `config.json` or `metadata.json` kiln reads.
const MAX_JSON: u64 = 64 << 20;

/// The members of a `.keras` file that kiln reads.
pub(crate) struct Archive {
    pub(crate) config: Vec<u8>,
    pub(crate) metadata: Option<Vec<u8>>,
    pub(crate) weights: Vec<u8>,
}

/// Reads the members of the `.keras` file at `path`.
pub(crate) fn read(path: &Path) -> Result<Archive> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| crate::io::io_error(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        Error::Data(format!(
            "{shown}: neither a .keras file (a zip archive: {e}) nor a legacy .h5 file (HDF5)"
        ))
    })?;
    let config = member(&mut zip, path, "config.json", MAX_JSON)?.ok_or_else(|| {
        Error::Data(format!(
            "{shown}: has no config.json: not a Keras 3 .keras file"
        ))
    })?;
    let metadata = member(&mut zip, path, "metadata.json", MAX_JSON)?;
    let weights = member(&mut zip, path, "model.weights.h5", u64::MAX)?.ok_or_else(|| {
        let npz = zip.index_for_name("model.weights.npz").is_some();
        Error::Data(format!(
            "{shown}: has no model.weights.h5{}",
            if npz {
                " (its weights are in the npz format, which kiln does not read: save with \
                 weights_format=\"h5\", Keras' default)"
            } else {
                ""
            }
        ))
    })?;
    Ok(Archive {
        config,
        metadata,
        weights,
    })
}

/// One member, read with its declared size checked first and never exceeded.
fn member<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    path: &Path,
    name: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>> {
    let shown = path.display();
    let Some(index) = zip.index_for_name(name) else {
        return Ok(None);
    };
    let entry = zip
        .by_index(index)
        .map_err(|e| Error::Data(format!("{shown}: member {name} cannot be read: {e}")))?;
    let (declared, stored) = (entry.size(), entry.compressed_size());
    if declared > limit {
        return Err(Error::Data(format!(
            "{shown}: member {name} declares {declared} bytes, more than the {limit} kiln reads"
        )));
    }
    if declared > BOMB_FLOOR && declared > MAX_EXPANSION.saturating_mul(stored) {
        return Err(Error::Data(format!(
            "{shown}: member {name} declares {declared} bytes but stores only {stored}: refused \
             as a decompression bomb"
        )));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(declared.min(BOMB_FLOOR)).unwrap_or(0));
    // One byte more than declared: a member that inflates past its declared size is caught.
    entry
        .take(declared.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Data(format!("{shown}: member {name} cannot be read: {e}")))?;
    if bytes.len() as u64 != declared {
        return Err(Error::Data(format!(
            "{shown}: member {name} declares {declared} bytes but holds {} or more: refused",
            bytes.len()
        )));
    }
    Ok(Some(bytes))
}

/// Writes a `.keras` file whole or not at all (a temporary file, then a rename).
pub(crate) fn write(path: &Path, config: &[u8], metadata: &[u8], weights: &[u8]) -> Result<()> {
    crate::io::write_atomically(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| crate::io::io_error(tmp, e))?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        let fail = |e: &dyn std::fmt::Display| {
            Error::Data(format!("{}: cannot write: {e}", path.display()))
        };
        for (name, bytes) in [
            ("metadata.json", metadata),
            ("config.json", config),
            ("model.weights.h5", weights),
        ] {
            zip.start_file(name, options).map_err(|e| fail(&e))?;
            zip.write_all(bytes).map_err(|e| fail(&e))?;
        }
        let mut inner = zip.finish().map_err(|e| fail(&e))?;
        inner.flush().map_err(|e| crate::io::io_error(tmp, e))?;
        Ok(())
    })
}
