//! Files: every file kiln writes goes to a temporary name first, is flushed to disk and renamed
//! into place, so an interrupted write never leaves a truncated file behind; a run folder is
//! locked while a process trains into it.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The prefix and marker of kiln's temporary files: `.<name>.tmp<pid>`.
const TMP_MARKER: &str = ".tmp";

/// An I/O error about `path`.
pub(crate) fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `path` through `write`, which receives a temporary path beside it; on success the
/// temporary file is flushed to disk and renamed over `path`. On failure it is removed and
/// `path` is left as it was.
pub fn write_atomically(
    path: impl AsRef<Path>,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Data(format!("{}: not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!("{TMP_MARKER}{}", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    // Errors that do not say which file (a full disk seen through candle's safetensors
    // writer, say) get the file's name.
    let written = write(&tmp)
        .map_err(|e| match e {
            Error::Candle(c) => Error::Data(format!("{}: cannot write: {c}", path.display())),
            other => other,
        })
        .and_then(|()| {
            file_operation_done();
            let file = std::fs::File::open(&tmp).map_err(|e| io_error(&tmp, e))?;
            file.sync_all().map_err(|e| io_error(&tmp, e))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| io_error(path, e))?;
    file_operation_done();
    Ok(())
}

/// Writes `bytes` to `path` atomically (see [`write_atomically`]).
pub(crate) fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| io_error(tmp, e))
    })
}

/// Writes named tensors (and header metadata) as a safetensors file, atomically. Encoded in
/// memory and written like every other file kiln writes (safetensors' own file writer creates
/// files readable by their owner alone).
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &std::collections::BTreeMap<String, candle_core::Tensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let tensors: std::collections::BTreeMap<&String, candle_core::Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k, t.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(&tensors, metadata).map_err(|e| {
        Error::Data(format!(
            "{}: cannot encode the tensors: {e}",
            path.display()
        ))
    })?;
    write_bytes_atomically(path, &bytes)
}

/// Removes the temporary files a killed kiln process left in `dir` (`.<name>.tmp<pid>`), when
/// no live process owns them. Call it while holding the folder's [`RunLock`].
pub(crate) fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_temporary = name.starts_with('.')
            && name
                .rsplit_once(TMP_MARKER)
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if is_temporary {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
            file_operation_done();
        }
    }
    Ok(())
}

/// An exclusive lock on a run folder, held while a process trains into it and released by the
/// operating system when the process ends in any way (so a killed run leaves no stale lock).
///
/// ```
/// let dir = std::env::temp_dir().join(format!("kiln-lock-doc-{}", std::process::id()));
/// let lock = kiln::io::RunLock::acquire(&dir)?;
/// assert!(kiln::io::RunLock::acquire(&dir).is_err()); // in use
/// drop(lock);
/// assert!(kiln::io::RunLock::acquire(&dir).is_ok());
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// The lock file's name inside a run folder.
    pub const FILE: &'static str = ".kiln.lock";

    /// Creates `dir` if needed and locks it.
    ///
    /// # Errors
    /// When another process holds the lock (the message names the folder and that process's
    /// id), or when the folder or lock file cannot be created.
    pub fn acquire(dir: impl AsRef<Path>) -> Result<RunLock> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let path = dir.join(Self::FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                let owner = owner.trim();
                return Err(Error::State(format!(
                    "run folder {} is in use by another kiln process{}: wait for it to end, or \
                     give another --out",
                    dir.display(),
                    if owner.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {owner})")
                    }
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error(&path, e)),
        }
        use std::io::{Seek, Write};
        let _ = file.set_len(0);
        let _ = file.seek(std::io::SeekFrom::Start(0));
        let _ = write!(file, "{}", std::process::id());
        Ok(RunLock { _file: file })
    }
}

/// Counts completed file operations for the crash tests: with `KILN_ABORT_AFTER_FILE_OPS=k` in
/// the environment, the process aborts (as abruptly as `kill -9`) right after its k-th write,
/// rename or removal, so that a test can stop a run at every point of a checkpoint's life.
fn file_operation_done() {
    static DONE: AtomicUsize = AtomicUsize::new(0);
    static LIMIT: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let limit = LIMIT.get_or_init(|| {
        std::env::var("KILN_ABORT_AFTER_FILE_OPS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let done = DONE.fetch_add(1, Ordering::SeqCst) + 1;
    if limit.is_some_and(|k| done >= k) {
        std::process::abort();
    }
}
