//! What the integration tests share: a fresh temporary folder and the `kiln` command run as a
//! user runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// An empty folder `kiln-<area>-<name>-<pid>` under the system's temporary folder (emptied if a
/// previous run left it); the area keeps the test modules' folders apart.
pub fn temp(area: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-{area}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the `kiln` binary with `args` in `dir`: whether it succeeded, its stdout and stderr.
pub fn kiln_in(args: &[&str], dir: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}
