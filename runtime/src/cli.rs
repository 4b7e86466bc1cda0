//! runc's command line. Flag names, short forms and defaults follow runc 1.1 so
//! containerd's shim, podman/conmon and scripts written for runc work unchanged.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::resources::UpdateFlags;

/// Where container state lives when `--root` is not given.
pub const DEFAULT_ROOT: &str = "/run/bosun-runc";

#[derive(Debug, Parser)]
#[command(
    name = "bosun-runc",
    version,
    about = "bosun-runc: a runc-compatible OCI runtime"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Enable debug logging
    #[arg(long, global = true)]
    pub debug: bool,
    /// Set the log file to write runtime logs to (default: stderr)
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Set the log format ('text' or 'json')
    #[arg(long = "log-format", global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Root directory for storage of container state (tmpfs recommended)
    #[arg(long, global = true, default_value = DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Path to the criu binary (accepted for compatibility; checkpointing is not supported)
    #[arg(long, global = true)]
    pub criu: Option<PathBuf>,
    /// Enable systemd cgroup support: cgroupsPath is "slice:prefix:name"
    #[arg(long = "systemd-cgroup", global = true)]
    pub systemd_cgroup: bool,
    /// Ignore cgroup permission errors ('true', 'false', or 'auto'). Not
    /// global: `spec --rootless` is a different, boolean flag, as in runc.
    #[arg(long, default_value = "auto", value_parser = ["true", "false", "auto"])]
    pub rootless: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a container
    Create(CreateArgs),
    /// Execute the user-defined process in a created container
    Start(IdArg),
    /// Create and run a container
    Run(RunArgs),
    /// Output the state of a container
    State(IdArg),
    /// Kill sends a signal to the container's init process
    Kill(KillArgs),
    /// Delete any resources held by the container
    Delete(DeleteArgs),
    /// Execute new process inside the container
    Exec(ExecArgs),
    /// Display the processes running inside a container
    Ps(PsArgs),
    /// List containers started by this runtime with the given root
    #[command(alias = "ls")]
    List(ListArgs),
    /// Suspend all processes inside the container
    Pause(IdArg),
    /// Resume all processes that have been previously paused
    Resume(IdArg),
    /// Display container events such as OOM notifications and resource statistics
    Events(EventsArgs),
    /// Update container resource constraints
    Update(UpdateArgs),
    /// Show the enabled features
    Features,
    /// Create a new specification file
    Spec(SpecArgs),
}

#[derive(Debug, Args)]
pub struct IdArg {
    pub id: String,
}

#[derive(Debug, Args, Clone)]
pub struct CreateArgs {
    /// Path to the root of the bundle directory
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Path to an AF_UNIX socket which will receive the pty master
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// Specify the file to write the process id to
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Do not use pivot root to jail process inside rootfs
    #[arg(long = "no-pivot")]
    pub no_pivot: bool,
    /// Do not create a new session keyring for the container
    #[arg(long = "no-new-keyring")]
    pub no_new_keyring: bool,
    /// Pass N additional file descriptors to the container (stdio + $LISTEN_FDS + N)
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: i32,
    pub id: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Detach from the container's process
    #[arg(short, long)]
    pub detach: bool,
    /// Do not delete the container after it exits
    #[arg(long)]
    pub keep: bool,
    /// Disable the use of the subreaper used to reap reparented processes
    #[arg(long = "no-subreaper")]
    pub no_subreaper: bool,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Send the signal to all processes in the container
    #[arg(short, long)]
    pub all: bool,
    pub id: String,
    /// Signal name or number
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Forcibly delete the container if it is still running (uses SIGKILL)
    #[arg(short, long)]
    pub force: bool,
    pub id: String,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Path to an AF_UNIX socket which will receive the pty master
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// Current working directory in the container
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Set environment variables (KEY=VALUE)
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Allocate a pseudo-TTY
    #[arg(short, long)]
    pub tty: bool,
    /// UID (format: <uid>[:<gid>])
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional gids
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// Path to the process.json
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Detach from the container's process
    #[arg(short, long)]
    pub detach: bool,
    /// Specify the file to write the process id to
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Set the asm process label for the process commonly used with selinux
    #[arg(long = "process-label")]
    pub process_label: Option<String>,
    /// Set the apparmor profile for the process
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Set the no new privileges value for the process
    #[arg(long = "no-new-privs")]
    pub no_new_privs: bool,
    /// Add a capability to the bounding set for the process
    #[arg(short, long)]
    pub cap: Vec<String>,
    /// Pass N additional file descriptors to the process
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: i32,
    /// Run the process in an (existing) sub-cgroup
    #[arg(long)]
    pub cgroup: Option<String>,
    /// Allow exec in a paused container
    #[arg(long = "ignore-paused")]
    pub ignore_paused: bool,
    pub id: String,
    /// Command and its arguments
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Select one of: table or json
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
    pub format: String,
    pub id: String,
    /// Options passed to ps (default -ef)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_options: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Select one of: table or json
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
    pub format: String,
    /// Display only container IDs
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Set the stats collection interval (e.g. 5s, 500ms)
    #[arg(long, default_value = "5s")]
    pub interval: String,
    /// Display the container's stats then exit
    #[arg(long)]
    pub stats: bool,
    pub id: String,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Path to a file with the new resources as OCI LinuxResources JSON ('-' for stdin)
    #[arg(short = 'r', long = "resources")]
    pub resources: Option<String>,
    #[command(flatten)]
    pub flags: UpdateFlags,
    pub id: String,
}

#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Path to the root of the bundle directory
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Generate a configuration for a rootless container
    #[arg(long = "rootless", id = "spec_rootless")]
    pub rootless: bool,
}

/// Parses a signal as runc's `kill` takes it: "9", "KILL", "SIGKILL", "kill".
pub fn parse_signal(s: &str) -> Option<nix::sys::signal::Signal> {
    use std::str::FromStr;
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).ok();
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    nix::sys::signal::Signal::from_str(&name).ok()
}

/// Parses a Go-style duration as `events --interval` takes it.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs > 0.0).then(|| std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        let mut v = vec!["bosun-runc"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn containerd_create() {
        let c = parse(&[
            "--root",
            "/run/containerd/runc/default",
            "--log",
            "/x/log.json",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "--no-new-keyring",
            "c1",
        ]);
        assert_eq!(c.global.log_format, "json");
        match c.command {
            Command::Create(a) => {
                assert_eq!(a.id, "c1");
                assert!(a.no_new_keyring);
                assert_eq!(a.bundle, PathBuf::from("/b"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn global_flags_after_subcommand() {
        let c = parse(&["state", "--root", "/r", "c1"]);
        assert_eq!(c.global.root, PathBuf::from("/r"));
    }

    #[test]
    fn exec_trailing_command() {
        let c = parse(&["exec", "-e", "A=1", "c1", "sh", "-c", "echo hi"]);
        match c.command {
            Command::Exec(a) => {
                assert_eq!(a.id, "c1");
                assert_eq!(a.command, vec!["sh", "-c", "echo hi"]);
                assert_eq!(a.env, vec!["A=1"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rootless_global_and_spec_flag_coexist() {
        let c = parse(&["--rootless", "true", "spec", "--rootless"]);
        assert_eq!(c.global.rootless, "true");
        assert!(matches!(
            c.command,
            Command::Spec(SpecArgs { rootless: true, .. })
        ));
    }

    #[test]
    fn kill_defaults_to_term() {
        match parse(&["kill", "--all", "c1"]).command {
            Command::Kill(k) => {
                assert!(k.all);
                assert_eq!(k.signal, "SIGTERM");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn signals() {
        use nix::sys::signal::Signal::*;
        assert_eq!(parse_signal("9"), Some(SIGKILL));
        assert_eq!(parse_signal("KILL"), Some(SIGKILL));
        assert_eq!(parse_signal("sigterm"), Some(SIGTERM));
        assert_eq!(parse_signal("WINCH"), Some(SIGWINCH));
        assert_eq!(parse_signal("NOPE"), None);
        assert_eq!(parse_signal("99"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("5s"),
            Some(std::time::Duration::from_secs(5))
        );
        assert_eq!(
            parse_duration("250ms"),
            Some(std::time::Duration::from_millis(250))
        );
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("0s"), None);
    }
}
