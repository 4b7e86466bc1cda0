//! poststart hooks after the user process has started, as the runtime spec
//! orders them. libcontainer's `Container::start` would run them as soon as
//! it has told init to go, racing init's exec; `start_hooks::start` sends
//! that signal instead, and `start` runs them here once init has exec'd.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use libcontainer::container::Container;

/// Longest we wait for init to exec before running the hooks anyway.
const EXEC_WAIT: Duration = Duration::from_secs(2);

/// The process's executable, to tell when init has exec'd.
pub fn exe_of(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Runs the container's poststart hooks once init (whose executable was
/// `init_exe` before start) has exec'd. Failures are warnings, as the spec
/// says for poststart.
pub fn run(c: &Container, init_exe: Option<PathBuf>) {
    let config = match c.spec() {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(id = c.id(), "poststart hooks unreadable: {e}");
            return;
        }
    };
    let Some(hooks) = config
        .hooks
        .as_ref()
        .and_then(|h| h.poststart().as_ref())
        .filter(|h| !h.is_empty())
    else {
        return;
    };
    if let (Some(pid), Some(before)) = (c.pid(), init_exe) {
        let deadline = Instant::now() + EXEC_WAIT;
        while exe_of(pid.as_raw()).is_some_and(|e| e == before) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    if let Err(e) =
        libcontainer::hooks::run_hooks(Some(hooks), Some(&c.state), Some(&c.root), None, None)
    {
        tracing::warn!(id = c.id(), "poststart hook failed: {e}");
    }
}
