//! Container capability sets from the CRI security context, with
//! containerd's defaults and its "ALL" add/drop rules.

use k8s_cri::v1::Capability;

use super::SpecError;

/// Linux capabilities by number, as the `caps` crate names them.
fn all_names() -> Vec<String> {
    let mut all: Vec<caps::Capability> = caps::all().into_iter().collect();
    all.sort_by_key(caps::Capability::index);
    all.iter().map(ToString::to_string).collect()
}

/// containerd's (and Docker's) default set for unprivileged containers.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The capability sets of a container process, as "CAP_..." names in
/// capability-number order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilitySets {
    /// Bounding, permitted and effective.
    pub granted: Vec<String>,
    /// Ambient and inheritable (a subset of `granted`).
    pub ambient: Vec<String>,
}

/// The capabilities in `available`, a mask by capability number: those
/// in this process's bounding set. A container cannot be given one outside
/// it (the kernel refuses, and the runtime fails), and one the kernel does
/// not know is never in it. containerd grants privileged containers the
/// same way (`WithAllCurrentCapabilities`).
pub fn all_capabilities(available: u64) -> Vec<String> {
    let mut all: Vec<caps::Capability> = caps::all()
        .into_iter()
        .filter(|c| c.index() < 64 && available & (1 << c.index()) != 0)
        .collect();
    all.sort_by_key(caps::Capability::index);
    all.iter().map(ToString::to_string).collect()
}

/// Applies containerd's rules: start from the defaults (or everything when
/// privileged); add "ALL", then drop "ALL", then add and drop single names.
/// CRI names come without "CAP_"; both spellings are accepted, any case.
pub fn capability_sets(
    caps: Option<&Capability>,
    privileged: bool,
    available: u64,
) -> Result<CapabilitySets, SpecError> {
    let all = all_capabilities(available);
    if privileged {
        return Ok(CapabilitySets {
            granted: all,
            ambient: Vec::new(),
        });
    }
    let mut set: Vec<String> = DEFAULT_CAPABILITIES
        .iter()
        .map(|c| (*c).to_owned())
        .collect();
    let Some(caps) = caps else {
        return Ok(CapabilitySets {
            granted: sorted(set),
            ambient: Vec::new(),
        });
    };
    let is_all = |name: &String| name.eq_ignore_ascii_case("ALL");
    if caps.add_capabilities.iter().any(is_all) {
        set.clone_from(&all);
    }
    if caps.drop_capabilities.iter().any(is_all) {
        set.clear();
    }
    for name in caps.add_capabilities.iter().filter(|n| !is_all(n)) {
        let cap = canonical("add_capabilities", name)?;
        if !set.contains(&cap) {
            set.push(cap);
        }
    }
    for name in caps.drop_capabilities.iter().filter(|n| !is_all(n)) {
        let cap = canonical("drop_capabilities", name)?;
        set.retain(|c| *c != cap);
    }
    let mut ambient = Vec::new();
    for name in &caps.add_ambient_capabilities {
        let cap = canonical("add_ambient_capabilities", name)?;
        // An ambient capability must also be permitted to take effect.
        if !set.contains(&cap) {
            set.push(cap.clone());
        }
        if !ambient.contains(&cap) {
            ambient.push(cap);
        }
    }
    Ok(CapabilitySets {
        granted: sorted(set),
        ambient: sorted(ambient),
    })
}

/// "net_admin" / "CAP_NET_ADMIN" → "CAP_NET_ADMIN"; unknown names are errors.
fn canonical(field: &'static str, name: &str) -> Result<String, SpecError> {
    let upper = name.to_ascii_uppercase();
    let cap = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    if all_names().contains(&cap) {
        Ok(cap)
    } else {
        Err(SpecError::Invalid {
            field,
            value: name.to_owned(),
            reason: "unknown capability".to_owned(),
        })
    }
}

fn sorted(mut caps: Vec<String>) -> Vec<String> {
    let all = all_names();
    caps.sort_by_key(|c| all.iter().position(|a| a == c));
    caps
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn caps(add: &[&str], drop: &[&str]) -> Capability {
        Capability {
            add_capabilities: add.iter().map(|s| (*s).to_owned()).collect(),
            drop_capabilities: drop.iter().map(|s| (*s).to_owned()).collect(),
            add_ambient_capabilities: Vec::new(),
        }
    }

    /// Capabilities 0..=40, as on a kernel that knows CAP_CHECKPOINT_RESTORE.
    const ALL_41: u64 = (1 << 41) - 1;

    fn granted(c: Option<&Capability>) -> Vec<String> {
        capability_sets(c, false, ALL_41).unwrap().granted
    }

    #[test]
    fn defaults_match_containerd() {
        let set = granted(None);
        assert_eq!(set.len(), 14);
        assert_eq!(set[0], "CAP_CHOWN");
        assert!(set.contains(&"CAP_AUDIT_WRITE".to_owned()));
        assert!(!set.contains(&"CAP_SYS_ADMIN".to_owned()));
        assert_eq!(granted(Some(&caps(&[], &[]))), set);
    }

    #[test]
    fn add_and_drop_names_in_any_spelling() {
        let set = granted(Some(&caps(
            &["net_admin", "CAP_SYS_TIME"],
            &["MKNOD", "cap_kill"],
        )));
        assert!(set.contains(&"CAP_NET_ADMIN".to_owned()));
        assert!(set.contains(&"CAP_SYS_TIME".to_owned()));
        assert!(!set.contains(&"CAP_MKNOD".to_owned()));
        assert!(!set.contains(&"CAP_KILL".to_owned()));
        assert_eq!(set.len(), 14);
    }

    #[test]
    fn all_rules() {
        assert_eq!(granted(Some(&caps(&["ALL"], &[]))).len(), 41);
        assert_eq!(granted(Some(&caps(&["all"], &["CHOWN"]))).len(), 40);
        assert!(granted(Some(&caps(&[], &["ALL"]))).is_empty());
        assert_eq!(
            granted(Some(&caps(&["NET_BIND_SERVICE"], &["ALL"]))),
            ["CAP_NET_BIND_SERVICE"]
        );
        // Drop ALL wins over add ALL, as in containerd.
        assert!(granted(Some(&caps(&["ALL"], &["ALL"]))).is_empty());
    }

    #[test]
    fn privileged_gets_what_the_kernel_knows() {
        let sets = capability_sets(Some(&caps(&[], &["ALL"])), true, (1 << 38) - 1).unwrap();
        assert_eq!(sets.granted.len(), 38);
        assert_eq!(sets.granted.last().unwrap(), "CAP_AUDIT_READ");
    }

    #[test]
    fn all_is_bounded_by_our_own_bounding_set() {
        // Root here runs without CAP_SYS_RESOURCE (24): asking the kernel
        // for it fails the container, so neither ALL nor privileged has it.
        let bounding = ALL_41 & !(1 << 24);
        let sets = capability_sets(None, true, bounding).unwrap();
        assert_eq!(sets.granted.len(), 40);
        assert!(!sets.granted.contains(&"CAP_SYS_RESOURCE".to_owned()));
        let added = capability_sets(Some(&caps(&["ALL"], &[])), false, bounding).unwrap();
        assert_eq!(added.granted, sets.granted);
    }

    #[test]
    fn ambient_capabilities_are_also_granted() {
        let mut c = caps(&[], &["ALL"]);
        c.add_ambient_capabilities = vec!["NET_BIND_SERVICE".to_owned()];
        let sets = capability_sets(Some(&c), false, 40).unwrap();
        assert_eq!(sets.granted, ["CAP_NET_BIND_SERVICE"]);
        assert_eq!(sets.ambient, ["CAP_NET_BIND_SERVICE"]);
    }

    #[test]
    fn unknown_names_are_errors() {
        let err = capability_sets(Some(&caps(&["SYS_WIZARD"], &[])), false, 40)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("add_capabilities") && err.contains("SYS_WIZARD"),
            "{err}"
        );
        let err = capability_sets(Some(&caps(&[], &["CAP_"])), false, 40)
            .unwrap_err()
            .to_string();
        assert!(err.contains("drop_capabilities"), "{err}");
    }
}
