//! poststart hooks after the user process has started, as the runtime spec
//! orders them. libcontainer runs them as soon as it has told init to go,
//! racing init's own startContainer hooks and exec. So at create we take them
//! out of libcontainer's saved config into a file beside it, and `start` runs
//! them once init has exec'd.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcontainer::config::YoukiConfig;
use libcontainer::container::Container;
use oci_spec::runtime::Hook;

const FILE: &str = "bosun-poststart.json";
/// Longest we wait for init to exec before running the hooks anyway.
const EXEC_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum PoststartError {
    #[error("moving poststart hooks of {}: {msg}", dir.display())]
    Move { dir: PathBuf, msg: String },
}

/// Moves the poststart hooks out of libcontainer's config in `dir`.
pub fn take(dir: &Path) -> Result<(), PoststartError> {
    let err = |msg: String| PoststartError::Move {
        dir: dir.to_path_buf(),
        msg,
    };
    let mut config = YoukiConfig::load(dir).map_err(|e| err(e.to_string()))?;
    let Some(hooks) = config.hooks.as_mut() else {
        return Ok(());
    };
    let Some(poststart) = hooks.poststart().clone().filter(|h| !h.is_empty()) else {
        return Ok(());
    };
    let text = serde_json::to_vec(&poststart).map_err(|e| err(e.to_string()))?;
    std::fs::write(dir.join(FILE), text).map_err(|e| err(e.to_string()))?;
    hooks.set_poststart(None);
    config.save(dir).map_err(|e| err(e.to_string()))
}

/// The process's executable, to tell when init has exec'd.
pub fn exe_of(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Runs the hooks `take` set aside, once init (whose executable was
/// `init_exe` before start) has exec'd. Failures are warnings, as the spec
/// says for poststart.
pub fn run(c: &Container, init_exe: Option<PathBuf>) {
    let Ok(text) = std::fs::read(c.root.join(FILE)) else {
        return;
    };
    let hooks: Vec<Hook> = match serde_json::from_slice(&text) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(id = c.id(), "poststart hooks unreadable: {e}");
            return;
        }
    };
    if let (Some(pid), Some(before)) = (c.pid(), init_exe) {
        let deadline = Instant::now() + EXEC_WAIT;
        while exe_of(pid.as_raw()).is_some_and(|e| e == before) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    if let Err(e) =
        libcontainer::hooks::run_hooks(Some(&hooks), Some(&c.state), Some(&c.root), None, None)
    {
        tracing::warn!(id = c.id(), "poststart hook failed: {e}");
    }
}
