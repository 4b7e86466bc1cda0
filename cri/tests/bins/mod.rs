//! Binaries of other workspace packages for the privileged cri tests and
//! benches (`bosun-cni`, `bosun-runc`): cargo only builds a package's own
//! binaries for its tests, so a missing one is built here, in the profile
//! of the caller (release for benches).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// `<target>/<triple>/<profile>` (`debug`, or `release` for benches),
/// holding `binary` of `package` (built if missing).
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
            let mut build = Command::new(cargo);
            build.args(["build", "-p", package]);
            if dir.ends_with("release") {
                build.arg("--release");
            }
            let status = build.status()?;
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
