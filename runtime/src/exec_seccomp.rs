//! The container's seccomp filter for processes `exec` starts.
//!
//! libcontainer 0.7 rebuilds an exec'd process's `linux` section without
//! `seccomp`, so the process would run unfiltered — a way out of the
//! container's profile. We load the filter ourselves, in the executor: the
//! last code that runs before `execve`. By then libcontainer has dropped the
//! capabilities to the process's own, and without no_new_privs loading a
//! filter needs CAP_SYS_ADMIN; so when the process lacks it, exec grants it
//! CAP_SYS_ADMIN (and CAP_SETPCAP, to shrink the bounding set) for setup,
//! and the executor takes both away again, from every set, right after the
//! filter is in. If that fails the process is not started.

use std::str::FromStr;

use caps::{CapSet, Capability};
use libcontainer::oci_spec::runtime::{LinuxSeccomp, Spec};
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use serde_json::Value;

/// What loading a filter needs without no_new_privs, in the order they are
/// taken away again (CAP_SETPCAP last: dropping from the bounding set needs
/// it).
const SETUP_CAPS: [&str; 2] = ["CAP_SYS_ADMIN", "CAP_SETPCAP"];

/// How the exec'd process gets the container's filter.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecFilter {
    /// The container's profile.
    pub seccomp: LinuxSeccomp,
    /// Capabilities exec grants for setup only; taken away before execve.
    pub setup_caps: Vec<String>,
}

impl ExecFilter {
    /// The plan for an exec into a container whose config is `spec`, of a
    /// process with effective capabilities `effective` and `no_new_privs`;
    /// `None` when the container has no filter.
    pub fn plan(spec: &Value, effective: &[String], no_new_privs: bool) -> Option<Self> {
        let seccomp = spec["linux"]["seccomp"].clone();
        if seccomp.is_null() {
            return None;
        }
        let seccomp: LinuxSeccomp = serde_json::from_value(seccomp).ok()?;
        let setup_caps = if no_new_privs || effective.iter().any(|c| c == "CAP_SYS_ADMIN") {
            Vec::new()
        } else {
            SETUP_CAPS
                .iter()
                .filter(|c| !effective.iter().any(|e| e == *c))
                .map(|c| c.to_string())
                .collect()
        };
        Some(Self {
            seccomp,
            setup_caps,
        })
    }

    /// Adds the setup capabilities to a process's bounding, effective and
    /// permitted sets (a process.json).
    pub fn grant(&self, process: &mut Value) {
        for set in ["bounding", "effective", "permitted"] {
            let mut caps: Vec<Value> = process["capabilities"][set]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for cap in &self.setup_caps {
                if !caps.iter().any(|c| c == cap.as_str()) {
                    caps.push(Value::from(cap.as_str()));
                }
            }
            process["capabilities"][set] = Value::from(caps);
        }
    }
}

/// The capability names of one set of a process object (`effective`, …).
pub fn cap_names(process: &Value, set: &str) -> Vec<String> {
    process["capabilities"][set]
        .as_array()
        .map(|caps| {
            caps.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl Executor for ExecFilter {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let fail = |what: String| ExecutorError::Other(format!("exec: {what}"));
        // A notify fd (SCMP_ACT_NOTIFY) has no agent to go to from exec.
        if let Some(fd) = libcontainer::seccomp::initialize_seccomp(&self.seccomp)
            .map_err(|e| fail(format!("load the container's seccomp filter: {e}")))?
        {
            let _ = nix::unistd::close(fd);
        }
        for name in &self.setup_caps {
            let cap = Capability::from_str(name).map_err(|e| fail(e.to_string()))?;
            for set in [
                CapSet::Bounding,
                CapSet::Ambient,
                CapSet::Inheritable,
                CapSet::Effective,
                CapSet::Permitted,
            ] {
                caps::drop(None, set, cap)
                    .map_err(|e| fail(format!("drop setup capability {name}: {e}")))?;
            }
        }
        libcontainer::workload::default::get_executor().exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> Value {
        json!({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}]}}})
    }

    #[test]
    fn no_filter_no_plan() {
        assert_eq!(ExecFilter::plan(&json!({"linux": {}}), &[], false), None);
    }

    #[test]
    fn setup_caps_only_when_needed() {
        let plain = ExecFilter::plan(&spec(), &["CAP_KILL".into()], false);
        assert_eq!(
            plain.map(|p| p.setup_caps),
            Some(vec!["CAP_SYS_ADMIN".to_owned(), "CAP_SETPCAP".to_owned()])
        );
        let nnp = ExecFilter::plan(&spec(), &[], true);
        assert_eq!(nnp.map(|p| p.setup_caps), Some(vec![]));
        let admin = ExecFilter::plan(&spec(), &["CAP_SYS_ADMIN".into()], false);
        assert_eq!(admin.map(|p| p.setup_caps), Some(vec![]));
        let setpcap = ExecFilter::plan(&spec(), &["CAP_SETPCAP".into()], false);
        assert_eq!(
            setpcap.map(|p| p.setup_caps),
            Some(vec!["CAP_SYS_ADMIN".to_owned()])
        );
    }

    #[test]
    fn grant_adds_to_three_sets_once() {
        let filter = ExecFilter::plan(&spec(), &[], false).unwrap_or_else(|| unreachable!());
        let mut process = json!({"capabilities": {"bounding": ["CAP_SYS_ADMIN"], "effective": []}});
        filter.grant(&mut process);
        assert_eq!(
            cap_names(&process, "bounding"),
            ["CAP_SYS_ADMIN", "CAP_SETPCAP"]
        );
        assert_eq!(
            cap_names(&process, "permitted"),
            ["CAP_SYS_ADMIN", "CAP_SETPCAP"]
        );
        assert!(cap_names(&process, "inheritable").is_empty());
    }
}
