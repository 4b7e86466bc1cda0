//! Seccomp profiles: the RuntimeDefault allowlist (moby's and containerd's
//! default profile, x86 family) and Localhost profiles loaded from the
//! node's profile root.

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

use super::SpecError;

/// Allowed for every container (moby `profiles/seccomp/default.json`,
/// unconditional rules plus the x86-only and kernel >= 4.8 ones).
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_time64",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "modify_ldt",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "process_vm_readv",
    "process_vm_writev",
    "pselect6",
    "pselect6_time64",
    "ptrace",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Syscalls allowed only when the container holds a capability.
const BY_CAPABILITY: &[(&str, &[&str])] = &[
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    (
        "CAP_SYS_ADMIN",
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    (
        "CAP_SYS_MODULE",
        &["delete_module", "init_module", "finit_module"],
    ),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_PTRACE",
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    (
        "CAP_SYS_TIME",
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    (
        "CAP_SYS_NICE",
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// clone(2) flags that create namespaces; without CAP_SYS_ADMIN clone is
/// allowed only when none of them is set.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;
/// personality(2) values moby allows: PER_LINUX, PER_LINUX32,
/// UNAME26, UNAME26|PER_LINUX32 and the query value 0xffffffff.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];
const AF_VSOCK: u64 = 40;
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The RuntimeDefault profile for a container whose bounding set is `caps`
/// ("CAP_..." names): deny with EPERM by default, allow moby's list, plus the
/// syscalls the given capabilities unlock.
pub fn default_seccomp_profile(caps: &[String]) -> Result<LinuxSeccomp, SpecError> {
    let has = |cap: &str| caps.iter().any(|c| c == cap);
    let mut syscalls = vec![allow(ALLOWED.iter().copied())?];

    // AF_VSOCK sockets reach the host: refuse them (moby does too).
    syscalls.push(allow_if(
        &["socket"],
        arg0(AF_VSOCK, LinuxSeccompOperator::ScmpCmpNe)?,
    )?);
    for &value in PERSONALITIES {
        syscalls.push(allow_if(
            &["personality"],
            arg0(value, LinuxSeccompOperator::ScmpCmpEq)?,
        )?);
    }
    for (cap, names) in BY_CAPABILITY {
        if has(cap) {
            syscalls.push(allow(names.iter().copied())?);
        }
    }
    if !has("CAP_SYS_ADMIN") {
        // MASKED_EQ compares (arg & value) == value_two.
        let no_namespace_flags = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(CLONE_NAMESPACE_FLAGS)
            .value_two(0u64)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()?;
        let clone = allow_if(&["clone"], no_namespace_flags)?;
        syscalls.push(clone);
        // ENOSYS makes libc fall back to clone, which the rule above checks.
        syscalls.push(
            LinuxSyscallBuilder::default()
                .names(vec!["clone3".to_owned()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(ENOSYS)
                .build()?,
        );
    }
    Ok(LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(EPERM)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(syscalls)
        .build()?)
}

fn allow<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<LinuxSyscall, SpecError> {
    Ok(LinuxSyscallBuilder::default()
        .names(names.into_iter().map(str::to_owned).collect::<Vec<_>>())
        .action(LinuxSeccompAction::ScmpActAllow)
        .build()?)
}

fn allow_if(names: &[&str], arg: LinuxSeccompArg) -> Result<LinuxSyscall, SpecError> {
    let mut rule = allow(names.iter().copied())?;
    rule.set_args(Some(vec![arg]));
    Ok(rule)
}

fn arg0(value: u64, op: LinuxSeccompOperator) -> Result<LinuxSeccompArg, SpecError> {
    Ok(LinuxSeccompArgBuilder::default()
        .index(0usize)
        .value(value)
        .op(op)
        .build()?)
}

/// Where a Localhost profile lives: an absolute path as given (the kubelet
/// resolves `localhost/<name>` under its seccomp root and sends the full
/// path; containerd and CRI-O take any absolute path, and critest keeps its
/// profiles in a temp dir), or a relative one under `root`. `..` is refused
/// either way, so a relative reference cannot leave `root`.
pub(super) fn localhost_profile_path(root: &Path, reference: &str) -> Result<PathBuf, SpecError> {
    let invalid = |reason: &str| SpecError::Invalid {
        field: "seccomp localhost profile",
        value: reference.to_owned(),
        reason: reason.to_owned(),
    };
    let path = Path::new(reference);
    if reference.is_empty() {
        return Err(invalid("empty profile reference"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(invalid("\"..\" is not allowed"));
    }
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    Ok(root.join(path))
}

/// Reads a Localhost profile: OCI `LinuxSeccomp` JSON, or the Docker/moby
/// format whose `archMap` lists architectures with their sub-architectures.
pub(super) fn load_profile(path: &Path) -> Result<LinuxSeccomp, SpecError> {
    let text = std::fs::read(path).map_err(|source| SpecError::ReadSeccompProfile {
        path: path.to_owned(),
        source,
    })?;
    let parse_err = |source| SpecError::ParseSeccompProfile {
        path: path.to_owned(),
        source,
    };
    let mut value: serde_json::Value = serde_json::from_slice(&text).map_err(parse_err)?;
    if let Some(obj) = value.as_object_mut() {
        if let Some(arch_map) = obj.remove("archMap") {
            if !obj.contains_key("architectures") {
                let arches: Vec<serde_json::Value> = arch_map
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|entry| {
                        let main = entry.get("architecture").cloned();
                        let subs = entry
                            .get("subArchitectures")
                            .and_then(|s| s.as_array())
                            .cloned()
                            .unwrap_or_default();
                        main.into_iter().chain(subs)
                    })
                    .collect();
                obj.insert("architectures".to_owned(), arches.into());
            }
        }
    }
    serde_json::from_value(value).map_err(parse_err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn names(profile: &LinuxSeccomp) -> Vec<String> {
        profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|s| s.action() == LinuxSeccompAction::ScmpActAllow)
            .flat_map(|s| s.names().clone())
            .collect()
    }

    #[test]
    fn default_profile_is_an_allowlist() {
        let profile = default_seccomp_profile(&[]).unwrap();
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(profile.default_errno_ret(), Some(EPERM));
        assert_eq!(
            profile.architectures().as_deref(),
            Some(&[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32][..])
        );
        let allowed = names(&profile);
        for name in [
            "read",
            "execve",
            "arch_prctl",
            "clone",
            "socket",
            "personality",
        ] {
            assert!(allowed.iter().any(|n| n == name), "{name}");
        }
        for name in ["mount", "unshare", "reboot", "chroot", "bpf", "kexec_load"] {
            assert!(!allowed.iter().any(|n| n == name), "{name}");
        }
        let json = serde_json::to_value(&profile).unwrap();
        let clone3 = json["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["names"][0] == "clone3")
            .unwrap();
        assert_eq!(clone3["action"], "SCMP_ACT_ERRNO");
        assert_eq!(clone3["errnoRet"], 38);
        let clone = json["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["names"] == serde_json::json!(["clone"]))
            .unwrap();
        assert_eq!(clone["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(clone["args"][0]["value"], 2_114_060_288u64);
        assert_eq!(clone["args"][0]["valueTwo"], 0);
    }

    #[test]
    fn capabilities_unlock_syscalls() {
        let caps = ["CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE"].map(String::from);
        let profile = default_seccomp_profile(&caps).unwrap();
        let allowed = names(&profile);
        for name in ["mount", "unshare", "setns", "chroot", "kcmp", "clone3"] {
            assert!(allowed.iter().any(|n| n == name), "{name}");
        }
        // With CAP_SYS_ADMIN clone is unrestricted: no masked rule, no ENOSYS.
        let json = serde_json::to_string(&profile).unwrap();
        assert!(!json.contains("MASKED_EQ"), "{json}");
        assert!(!json.contains("\"errnoRet\":38"), "{json}");
    }

    #[test]
    fn localhost_paths_absolute_or_under_the_root() {
        let root = Path::new("/var/lib/kubelet/seccomp");
        assert_eq!(
            localhost_profile_path(root, "profiles/audit.json").unwrap(),
            root.join("profiles/audit.json")
        );
        assert_eq!(
            localhost_profile_path(root, "/var/lib/kubelet/seccomp/a.json").unwrap(),
            root.join("a.json")
        );
        assert_eq!(
            localhost_profile_path(root, "/tmp/seccomp-tests1/block-chmod.json").unwrap(),
            Path::new("/tmp/seccomp-tests1/block-chmod.json")
        );
        for bad in [
            "../etc/shadow",
            "a/../../x",
            "/var/lib/kubelet/seccomp/../x",
            "",
        ] {
            let err = localhost_profile_path(root, bad).unwrap_err().to_string();
            assert!(err.contains("seccomp localhost profile"), "{bad}: {err}");
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn loads_oci_and_moby_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let oci = dir.path().join("oci.json");
        std::fs::write(
            &oci,
            r#"{"defaultAction":"SCMP_ACT_LOG","architectures":["SCMP_ARCH_X86_64"],
                "syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#,
        )
        .unwrap();
        let profile = load_profile(&oci).unwrap();
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActLog);

        let moby = dir.path().join("moby.json");
        std::fs::write(
            &moby,
            r#"{"defaultAction":"SCMP_ACT_ERRNO","archMap":[{"architecture":"SCMP_ARCH_X86_64",
                "subArchitectures":["SCMP_ARCH_X86","SCMP_ARCH_X32"]}],
                "syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW","comment":"x"}]}"#,
        )
        .unwrap();
        let profile = load_profile(&moby).unwrap();
        assert_eq!(profile.architectures().as_ref().unwrap().len(), 3);

        let err = load_profile(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
        std::fs::write(dir.path().join("bad.json"), "{").unwrap();
        let err = load_profile(&dir.path().join("bad.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.json"), "{err}");
    }
}
