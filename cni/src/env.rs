//! The `CNI_*` environment a runtime passes with every invocation.
//!
//! Parsing is pure (over any key lookup) so every rule is unit-tested; the
//! binary feeds it `std::env::var`.

use std::net::IpAddr;

use crate::error::CniError;

/// The verbs of CNI 1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container to the network.
    Add,
    /// Detach it; idempotent.
    Del,
    /// Verify an attachment is still as ADD left it.
    Check,
    /// Report the spec versions this plugin speaks.
    Version,
    /// Report whether the plugin can serve ADDs now.
    Status,
    /// Release everything not in the runtime's list of valid attachments.
    Gc,
}

/// What the verb acts on: present for ADD, DEL and CHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`; DEL may come without one (the namespace is gone).
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `IP=` from `CNI_ARGS` (host-local's way of asking for addresses).
    pub requested_ips: Vec<IpAddr>,
}

/// One invocation's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// The container side, for verbs that have one.
    pub target: Option<Target>,
}

/// Linux's IFNAMSIZ minus the trailing NUL.
const MAX_IFNAME: usize = 15;

/// Reads the environment through `var` (which returns `None` for unset).
pub fn parse(var: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let command = match var("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        Some("STATUS") => Command::Status,
        Some("GC") => Command::Gc,
        Some(other) => {
            return Err(CniError::invalid_environment(format!(
                "CNI_COMMAND={other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
            )))
        }
        None => return Err(CniError::invalid_environment("CNI_COMMAND is not set")),
    };
    let target = match command {
        Command::Add | Command::Del | Command::Check => Some(target(&var, command)?),
        Command::Version | Command::Status | Command::Gc => None,
    };
    Ok(Env { command, target })
}

fn target(var: &impl Fn(&str) -> Option<String>, command: Command) -> Result<Target, CniError> {
    let required = |name: &str| {
        var(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| CniError::invalid_environment(format!("{name} is not set")))
    };
    let container_id = required("CNI_CONTAINERID")?;
    check_container_id(&container_id)?;
    let ifname = required("CNI_IFNAME")?;
    check_ifname(&ifname)?;
    let netns = match command {
        Command::Del => var("CNI_NETNS").filter(|v| !v.is_empty()),
        _ => Some(required("CNI_NETNS")?),
    };
    let requested_ips = requested_ips(var("CNI_ARGS").as_deref().unwrap_or(""))?;
    Ok(Target {
        container_id,
        netns,
        ifname,
        requested_ips,
    })
}

/// The spec allows letters, digits, `_`, `.` and `-`, starting with a letter
/// or digit; the ID also names files, so nothing else may pass.
fn check_container_id(id: &str) -> Result<(), CniError> {
    let first_ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(CniError::invalid_environment(format!(
            "CNI_CONTAINERID {id:?} must be letters, digits, '_', '.' or '-', starting with a letter or digit"
        )))
    }
}

/// The kernel's rules for interface names.
fn check_ifname(name: &str) -> Result<(), CniError> {
    let bad = name.len() > MAX_IFNAME
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        Err(CniError::invalid_environment(format!(
            "CNI_IFNAME {name:?} is not a valid interface name (at most 15 characters, no '/', ':' or spaces)"
        )))
    } else {
        Ok(())
    }
}

/// `CNI_ARGS` is `K=V;K=V`. Only `IP` means something to us (a comma list,
/// as host-local reads it); other keys are the runtime's business (e.g.
/// `K8S_POD_NAME`) and ignored, as `IgnoreUnknown=1` asks.
fn requested_ips(args: &str) -> Result<Vec<IpAddr>, CniError> {
    let mut out = Vec::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(CniError::invalid_environment(format!(
                "CNI_ARGS entry {pair:?} is not KEY=VALUE"
            )));
        };
        if key == "IP" {
            for ip in value.split(',').filter(|v| !v.is_empty()) {
                out.push(ip.parse().map_err(|_| {
                    CniError::invalid_environment(format!(
                        "CNI_ARGS IP={ip:?} is not an IP address"
                    ))
                })?);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::error::code;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        parse(|k| map.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-123"),
        ("CNI_NETNS", "/run/netns/p"),
        ("CNI_IFNAME", "eth0"),
    ];

    #[test]
    fn add_needs_id_netns_and_ifname() {
        let parsed = env(ADD).unwrap();
        assert_eq!(parsed.command, Command::Add);
        let target = parsed.target.unwrap();
        assert_eq!(target.container_id, "abc-123");
        assert_eq!(target.netns.as_deref(), Some("/run/netns/p"));
        for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let pairs: Vec<_> = ADD.iter().copied().filter(|(k, _)| *k != missing).collect();
            let err = env(&pairs).unwrap_err();
            assert_eq!(err.code, code::INVALID_ENVIRONMENT_VARIABLES);
            assert!(err.details.contains(missing), "{err}");
        }
    }

    #[test]
    fn del_tolerates_a_missing_netns() {
        let parsed = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(parsed.target.unwrap().netns, None);
    }

    #[test]
    fn version_status_and_gc_need_no_container() {
        for verb in ["VERSION", "STATUS", "GC"] {
            assert_eq!(env(&[("CNI_COMMAND", verb)]).unwrap().target, None);
        }
    }

    #[test]
    fn unknown_or_missing_command_is_code_4() {
        assert_eq!(
            env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code,
            code::INVALID_ENVIRONMENT_VARIABLES
        );
        assert!(env(&[]).unwrap_err().details.contains("CNI_COMMAND"));
    }

    #[test]
    fn container_id_and_ifname_follow_the_rules() {
        for (key, value) in [
            ("CNI_CONTAINERID", "../etc"),
            ("CNI_CONTAINERID", "-x"),
            ("CNI_IFNAME", "a/b"),
            ("CNI_IFNAME", "name-that-is-too-long"),
            ("CNI_IFNAME", ".."),
        ] {
            let pairs: Vec<_> = ADD
                .iter()
                .map(|(k, v)| if *k == key { (*k, value) } else { (*k, *v) })
                .collect();
            let err = env(&pairs).unwrap_err();
            assert!(err.details.contains(key), "{key}={value}: {err}");
        }
    }

    #[test]
    fn cni_args_ip_is_read_and_other_keys_ignored() {
        let mut pairs = ADD.to_vec();
        pairs.push((
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAME=x;IP=10.1.0.9,fd00::9",
        ));
        let target = env(&pairs).unwrap().target.unwrap();
        assert_eq!(
            target.requested_ips,
            vec![
                "10.1.0.9".parse::<IpAddr>().unwrap(),
                "fd00::9".parse().unwrap()
            ]
        );
        pairs.pop();
        pairs.push(("CNI_ARGS", "IP=nope"));
        assert!(env(&pairs).unwrap_err().details.contains("nope"));
    }
}
