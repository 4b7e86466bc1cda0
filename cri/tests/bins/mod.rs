//! Binaries of other workspace packages for the privileged cri tests
//! (`bosun-cni`, `bosun-runc`): cargo only builds a package's own binaries
//! for its tests, so a missing one is built here.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// `<target>/<triple>/debug`, holding `binary` of `package` (built if missing).
pub fn workspace_bin_dir(needed: &[(&str, &str)]) -> Result<PathBuf> {
    // <target>/<triple>/debug/deps/<test>-<hash> → <target>/<triple>/debug
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no grandparent dir")?
        .to_owned();
    for (package, binary) in needed {
        if !dir.join(binary).is_file() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", package])
                .status()?;
            ensure!(status.success(), "cargo build -p {package} failed");
        }
        ensure!(
            dir.join(binary).is_file(),
            "no {binary} in {}: run cargo build -p {package}",
            dir.display()
        );
    }
    Ok(dir)
}
