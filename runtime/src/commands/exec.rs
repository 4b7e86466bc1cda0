//! exec: a new process in a running container's namespaces and cgroup.

use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::ContainerStatus;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::SigSet;
use serde_json::{json, Value};

use super::lifecycle::{forward_until_exit, private_dir, set_subreaper};
use super::Ctx;
use crate::cli::ExecArgs;
use crate::exec_seccomp::{cap_names, ExecFilter};
use crate::tty::ConsoleSocket;
use crate::Error;

/// `<uid>[:<gid>]` as runc's `--user` takes it.
pub fn parse_user(s: &str) -> Result<(u32, Option<u32>), Error> {
    let bad = || Error::Invalid(format!("invalid --user {s:?}: want <uid>[:<gid>]"));
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = u.parse().map_err(|_| bad())?;
    let gid = g.map(|g| g.parse().map_err(|_| bad())).transpose()?;
    Ok((uid, gid))
}

/// An exec with a command line is turned into a process file, as runc builds
/// it: the container's own process (user, env, cwd, capabilities,
/// no_new_privs) with the flags applied over it. libcontainer's own
/// command-line path would run it as root with no_new_privs, and it takes
/// `terminal` only from a file.
fn flag_process(spec_process: &Value, a: &ExecArgs) -> Result<Value, Error> {
    let mut p = spec_process.clone();
    p["terminal"] = json!(a.tty);
    p["args"] = json!(a.command);
    if let Some(cwd) = &a.cwd {
        p["cwd"] = json!(cwd);
    }
    let mut env: Vec<Value> = p["env"].as_array().cloned().unwrap_or_default();
    for kv in &a.env {
        let key = kv.split('=').next().unwrap_or_default();
        env.retain(|e| e.as_str().and_then(|s| s.split('=').next()) != Some(key));
        env.push(json!(kv));
    }
    p["env"] = json!(env);
    if let Some(u) = &a.user {
        let (uid, gid) = parse_user(u)?;
        p["user"]["uid"] = json!(uid);
        if let Some(gid) = gid {
            p["user"]["gid"] = json!(gid);
        }
    }
    if !a.additional_gids.is_empty() {
        p["user"]["additionalGids"] = json!(a.additional_gids);
    }
    if a.no_new_privs {
        p["noNewPrivileges"] = json!(true);
    }
    if let Some(profile) = &a.apparmor {
        p["apparmorProfile"] = json!(profile);
    }
    if let Some(label) = &a.process_label {
        p["selinuxLabel"] = json!(label);
    }
    if !a.cap.is_empty() {
        for set in ["bounding", "effective", "permitted"] {
            let mut caps: Vec<Value> = p["capabilities"][set]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for c in &a.cap {
                if !caps.iter().any(|x| x == c) {
                    caps.push(json!(c));
                }
            }
            p["capabilities"][set] = json!(caps);
        }
    }
    Ok(p)
}

pub fn exec(ctx: &Ctx, a: &ExecArgs) -> Result<i32, Error> {
    let c = ctx.load(&a.id)?;
    match c.status() {
        ContainerStatus::Stopped => {
            return Err(Error::Invalid("cannot exec in a stopped container".into()))
        }
        ContainerStatus::Paused if !a.ignore_paused => {
            return Err(Error::Invalid(
                "cannot exec in a paused container (use --ignore-paused to override)".into(),
            ))
        }
        _ => {}
    }
    if a.process.is_none() && a.command.is_empty() {
        return Err(Error::Invalid(
            "exec: no command given (args or --process)".into(),
        ));
    }
    let config = c.bundle().join("config.json");
    let spec: Value = std::fs::read_to_string(&config)
        .map_err(|e| Error::io("reading", &config, e))
        .and_then(|t| {
            serde_json::from_str(&t)
                .map_err(|e| Error::Invalid(format!("{}: {e}", config.display())))
        })?;
    // The process as it will run: from --process, or the container's own
    // with the flags over it.
    let mut process = match &a.process {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Error::io("reading", path, e))
            .and_then(|t| {
                serde_json::from_str::<Value>(&t)
                    .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
            })?,
        None => flag_process(&spec["process"], a)?,
    };
    let filter = ExecFilter::plan(
        &spec,
        &cap_names(&process, "effective"),
        process["noNewPrivileges"] == true || a.no_new_privs,
    );
    let granting = filter.as_ref().is_some_and(|f| !f.setup_caps.is_empty());
    let tmp = private_dir()?;
    let process_file = match (&a.process, &filter) {
        (Some(path), _) if !granting => path.clone(),
        _ => {
            if let Some(filter) = &filter {
                filter.grant(&mut process);
            }
            let path: PathBuf = tmp.path().join("process.json");
            std::fs::write(&path, process.to_string())
                .map_err(|e| Error::io("writing", &path, e))?;
            path
        }
    };
    let console = if a.tty && a.console_socket.is_none() && !a.detach {
        Some(ConsoleSocket::bind(tmp.path())?)
    } else {
        None
    };
    let console_path = console
        .as_ref()
        .map(|c| c.path().to_path_buf())
        .or_else(|| a.console_socket.clone());
    let signals = SigSet::all();
    if !a.detach {
        set_subreaper()?;
        signals.thread_block().map_err(|source| Error::Sys {
            what: "blocking signals",
            source,
        })?;
    }
    let mut builder = ContainerBuilder::new(a.id.clone(), SyscallType::default());
    if let Some(filter) = filter {
        builder = builder.with_executor(filter);
    }
    let pid = builder
        .with_root_path(&ctx.root)
        .and_then(|b| b.with_pid_file(a.pid_file.as_ref()))
        .map(|b| {
            b.with_console_socket(console_path.as_ref())
                .with_preserved_fds(a.preserve_fds)
        })
        .and_then(|b| b.validate_id())
        .and_then(|b| {
            b.as_tenant()
                // As in `run`: `detach` only gates the console socket check.
                .with_detach(a.detach || console_path.is_some())
                .with_process(Some(&process_file))
                .with_ignore_paused(a.ignore_paused)
                .with_sub_cgroup(a.cgroup.clone())
                .with_process_label(a.process_label.clone())
                .with_apparmor(a.apparmor.clone())
                .build()
        })
        .map_err(|e| Error::lib("exec in", &a.id, e))?;
    if a.detach {
        return Ok(0);
    }
    let relay = match console {
        Some(cs) => {
            let master = cs.receive_master()?;
            Some(std::thread::spawn(move || crate::tty::relay(master)))
        }
        None => None,
    };
    let status = forward_until_exit(pid, &signals)?;
    if let Some(r) = relay {
        let _ = r.join();
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn users() {
        assert_eq!(parse_user("1000").ok(), Some((1000, None)));
        assert_eq!(parse_user("1000:2000").ok(), Some((1000, Some(2000))));
        assert!(parse_user("bob").is_err());
    }

    #[test]
    fn flag_process_applies_flags() {
        let cli = crate::cli::Cli::try_parse_from([
            "r",
            "exec",
            "-t",
            "-e",
            "A=2",
            "-u",
            "1000:1000",
            "--cap",
            "CAP_NET_ADMIN",
            "c1",
            "sh",
        ]);
        let Ok(crate::cli::Cli {
            command: crate::cli::Command::Exec(a),
            ..
        }) = cli
        else {
            panic!("parse")
        };
        let base = json!({"env": ["PATH=/bin", "A=1"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                          "capabilities": {"bounding": ["CAP_KILL"]}});
        let p = flag_process(&base, &a).unwrap_or_default();
        assert_eq!(p["terminal"], true);
        assert_eq!(p["args"], json!(["sh"]));
        assert_eq!(p["env"], json!(["PATH=/bin", "A=2"]));
        assert_eq!(p["user"]["uid"], 1000);
        assert_eq!(
            p["capabilities"]["bounding"],
            json!(["CAP_KILL", "CAP_NET_ADMIN"])
        );
    }
}
