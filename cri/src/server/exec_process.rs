//! The OCI process an exec runs: the container's own process (user,
//! supplementary groups, capabilities, environment, working dir,
//! no_new_privs, rlimits, AppArmor/SELinux labels) with the exec's command,
//! as containerd builds it. Handed to the runtime as `exec --process FILE`,
//! so what an exec runs as does not depend on what a runtime defaults to
//! when only given a command line (bosun-runc exec would run as root).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Why an exec process could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ExecProcessError {
    /// The container's bundle config could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bundle config is not a runtime spec with a process.
    #[error("{path}: {reason}")]
    Spec { path: PathBuf, reason: String },
}

/// The exec process from a container's runtime spec: its `process` with
/// `args` and `terminal` replaced (and `TERM` set for a tty, as
/// containerd does).
pub fn from_spec(spec: &Value, args: &[String], tty: bool) -> Result<Value, String> {
    let mut process = spec
        .get("process")
        .filter(|p| p.is_object())
        .cloned()
        .ok_or("no process object")?;
    process["args"] = Value::from(args.to_vec());
    process["terminal"] = Value::Bool(tty);
    // The container's console size belongs to its own terminal.
    if let Some(p) = process.as_object_mut() {
        p.remove("consoleSize");
    }
    if tty {
        let env = process["env"].as_array().cloned().unwrap_or_default();
        let has_term = env
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.starts_with("TERM=")));
        if !has_term {
            let mut env = env;
            env.push(Value::from("TERM=xterm"));
            process["env"] = Value::Array(env);
        }
    }
    Ok(process)
}

/// Writes the exec process for the container whose bundle is `bundle` to
/// `dest`.
pub fn write(
    bundle: &Path,
    args: &[String],
    tty: bool,
    dest: &Path,
) -> Result<(), ExecProcessError> {
    let config = bundle.join("config.json");
    let text = std::fs::read(&config).map_err(|source| ExecProcessError::Io {
        action: "read",
        path: config.clone(),
        source,
    })?;
    let spec: Value = serde_json::from_slice(&text).map_err(|e| ExecProcessError::Spec {
        path: config.clone(),
        reason: e.to_string(),
    })?;
    let process = from_spec(&spec, args, tty).map_err(|reason| ExecProcessError::Spec {
        path: config.clone(),
        reason,
    })?;
    std::fs::write(dest, process.to_string()).map_err(|source| ExecProcessError::Io {
        action: "write",
        path: dest.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn spec() -> Value {
        json!({"ociVersion": "1.0.2", "process": {
            "terminal": true, "consoleSize": {"height": 24, "width": 80},
            "user": {"uid": 1001, "gid": 1001, "additionalGids": [1234, 5678]},
            "args": ["top"], "env": ["PATH=/bin"], "cwd": "/work",
            "capabilities": {"bounding": ["CAP_KILL"]}, "noNewPrivileges": true
        }})
    }

    #[test]
    fn keeps_the_containers_identity_and_replaces_the_command() {
        let p = from_spec(&spec(), &["id".to_owned(), "-G".to_owned()], false).unwrap();
        assert_eq!(p["args"], json!(["id", "-G"]));
        assert_eq!(p["terminal"], false);
        assert_eq!(p["user"]["uid"], 1001);
        assert_eq!(p["user"]["additionalGids"], json!([1234, 5678]));
        assert_eq!(p["cwd"], "/work");
        assert_eq!(p["capabilities"]["bounding"], json!(["CAP_KILL"]));
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["env"], json!(["PATH=/bin"]));
        assert!(p.get("consoleSize").is_none());
    }

    #[test]
    fn a_tty_gets_term_unless_set() {
        let p = from_spec(&spec(), &["sh".to_owned()], true).unwrap();
        assert_eq!(p["terminal"], true);
        assert_eq!(p["env"], json!(["PATH=/bin", "TERM=xterm"]));
        let mut s = spec();
        s["process"]["env"] = json!(["TERM=vt100"]);
        assert_eq!(
            from_spec(&s, &["sh".to_owned()], true).unwrap()["env"],
            json!(["TERM=vt100"])
        );
    }

    #[test]
    fn a_spec_without_process_is_an_error() {
        assert!(from_spec(&json!({"ociVersion": "1.0.2"}), &[], false).is_err());
        let dir = tempfile::tempdir().unwrap();
        let err = write(dir.path(), &[], false, &dir.path().join("p.json")).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
