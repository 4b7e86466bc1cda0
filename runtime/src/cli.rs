//! runc's command line. Flag names, short forms and defaults follow runc 1.1 so
//! containerd's shim, podman/conmon and scripts written for runc work unchanged.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, FromArgMatches, Parser, Subcommand};

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

impl Cli {
    /// [`Cli::parse`], building clap's parser for the invoked subcommand only
    /// when the command line is a plain, valid one (see [`Cli::parse_lean`]).
    pub fn parse_args() -> Cli {
        let args: Vec<OsString> = std::env::args_os().collect();
        match Cli::parse_lean(&args) {
            Some(cli) => cli,
            None => Cli::parse_from(args),
        }
    }

    /// Parses `args` with a parser for the root flags and the one subcommand
    /// named, instead of all fifteen: building every subcommand's arguments
    /// (and a copy of the global flags for each) is most of the heap and a
    /// good part of the code a short call like `start` touches. `None` for
    /// anything but a plain valid command line (help, version, an unknown
    /// flag before the subcommand, any parse error), which the full parser
    /// then handles, so help and error output stay exactly clap's.
    pub fn parse_lean(args: &[OsString]) -> Option<Cli> {
        let name = invoked_subcommand(args)?;
        let sub = subcommand(name)?;
        let root = clap::Command::new("bosun-runc")
            .subcommand_required(true)
            .arg_required_else_help(true);
        let root = Global::augment_args(root).subcommand(sub);
        let matches = root.try_get_matches_from(args).ok()?;
        Cli::from_arg_matches(&matches).ok()
    }
}

/// The subcommand a command line invokes, if every flag before it is a
/// known root flag and no help or version is asked for anywhere.
fn invoked_subcommand(args: &[OsString]) -> Option<&str> {
    let root = Global::augment_args(clap::Command::new("root"));
    let mut name = None;
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        let arg = arg.to_str()?;
        if let Some(flag) = arg.strip_prefix("--") {
            let (flag, inline_value) = match flag.split_once('=') {
                Some((f, _)) => (f, true),
                None => (flag, false),
            };
            let known = root.get_arguments().find(|a| a.get_long() == Some(flag))?;
            if known.get_action().takes_values() && !inline_value {
                rest.next()?;
            }
        } else if arg.starts_with('-') {
            return None;
        } else {
            name = Some(arg);
            break;
        }
    }
    let asks_help = |a: &OsString| {
        matches!(
            a.to_str(),
            Some("-h" | "--help" | "-V" | "--version" | "help")
        )
    };
    if args.iter().skip(1).any(asks_help) {
        return None;
    }
    name
}

/// One subcommand's parser, named and configured as `#[derive(Subcommand)]`
/// makes it for [`Command`] (help text aside: help goes to the full parser).
fn subcommand(name: &str) -> Option<clap::Command> {
    let sub = |n: &'static str| clap::Command::new(n);
    Some(match name {
        "create" => CreateArgs::augment_args(sub("create")),
        "start" => IdArg::augment_args(sub("start")),
        "run" => RunArgs::augment_args(sub("run")),
        "state" => IdArg::augment_args(sub("state")),
        "kill" => KillArgs::augment_args(sub("kill")),
        "delete" => DeleteArgs::augment_args(sub("delete")),
        "exec" => ExecArgs::augment_args(sub("exec")),
        "ps" => PsArgs::augment_args(sub("ps")),
        "list" | "ls" => ListArgs::augment_args(sub("list").alias("ls")),
        "pause" => IdArg::augment_args(sub("pause")),
        "resume" => IdArg::augment_args(sub("resume")),
        "events" => EventsArgs::augment_args(sub("events")),
        "update" => UpdateArgs::augment_args(sub("update")),
        "features" => sub("features"),
        "spec" => SpecArgs::augment_args(sub("spec")),
        _ => return None,
    })
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

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("bosun-runc")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn lean_parser_agrees_with_the_full_one() {
        let cases: &[&[&str]] = &[
            // containerd's shim and podman/conmon, as they call runc
            &[
                "--root",
                "/run/containerd/runc/k8s.io",
                "--log",
                "/b/log.json",
                "--log-format",
                "json",
                "--systemd-cgroup",
                "create",
                "--bundle",
                "/b",
                "--pid-file",
                "/b/init.pid",
                "--console-socket",
                "/s.sock",
                "--no-new-keyring",
                "--preserve-fds",
                "2",
                "c1",
            ],
            &[
                "--root=/r",
                "--log=/l",
                "--debug",
                "create",
                "-b",
                "/b",
                "--no-pivot",
                "c1",
            ],
            &["--root", "/r", "start", "c1"],
            &["state", "--root", "/r", "c1"],
            &["kill", "--all", "c1", "KILL"],
            &["kill", "c1"],
            &["delete", "--force", "c1"],
            &["delete", "-f", "c1", "--log-format", "json"],
            &[
                "exec",
                "--process",
                "/p.json",
                "--detach",
                "--pid-file",
                "/p",
                "c1",
            ],
            &[
                "exec", "-e", "A=1", "-t", "-u", "0:0", "-g", "10", "c1", "sh", "-c", "ls -h",
            ],
            &[
                "exec", "--cap", "CAP_KILL", "--cwd", "/tmp", "c1", "ls", "--", "-x",
            ],
            &["ps", "--format", "json", "c1"],
            &["ps", "c1", "-o", "pid"],
            &["list", "-q"],
            &["ls", "--format", "json"],
            &["pause", "c1"],
            &["resume", "c1"],
            &["events", "--stats", "c1"],
            &["events", "--interval", "1s", "c1"],
            &["update", "--memory", "1048576", "--cpu-share", "512", "c1"],
            &["update", "-r", "-", "c1"],
            &["features"],
            &["spec", "--bundle", "/b"],
            &["--rootless", "true", "spec", "--rootless"],
            &[
                "--rootless=auto",
                "run",
                "-d",
                "--keep",
                "--bundle",
                "/b",
                "c1",
            ],
            &["--criu", "/usr/sbin/criu", "run", "c1"],
        ];
        for case in cases {
            let args = argv(case);
            let Some(lean) = Cli::parse_lean(&args) else {
                panic!("lean parser declined {case:?}");
            };
            let full = match Cli::try_parse_from(&args) {
                Ok(c) => c,
                Err(e) => panic!("{case:?}: {e}"),
            };
            assert_eq!(format!("{lean:?}"), format!("{full:?}"), "{case:?}");
        }
    }

    #[test]
    fn lean_parser_leaves_help_and_errors_to_clap() {
        let cases: &[&[&str]] = &[
            &[],
            &["--help"],
            &["-h"],
            &["--version"],
            &["create", "--help"],
            &["help", "create"],
            &["exec", "c1", "ls", "-h"],
            &["frobnicate"],
            &["--nope", "state", "c1"],
            &["-x", "state", "c1"],
            &["--root"],
            &["state"],
            &["kill", "c1", "KILL", "extra"],
            &["create", "--bogus", "c1"],
            &["--log-format", "yaml", "state", "c1"],
        ];
        for case in cases {
            assert!(Cli::parse_lean(&argv(case)).is_none(), "{case:?}");
        }
    }

    #[test]
    fn lean_parser_has_every_subcommand_as_derived() {
        let arg_list = |c: &clap::Command| -> Vec<String> {
            c.get_arguments().map(|a| format!("{a:?}")).collect()
        };
        let full = Cli::command();
        for sub in full.get_subcommands() {
            for name in std::iter::once(sub.get_name()).chain(sub.get_all_aliases()) {
                let Some(lean) = subcommand(name) else {
                    panic!("lean parser lacks subcommand {name}");
                };
                assert_eq!(lean.get_name(), sub.get_name());
                assert_eq!(arg_list(&lean), arg_list(sub), "arguments of {name}");
                let aliases: Vec<&str> = lean.get_all_aliases().collect();
                let want: Vec<&str> = sub.get_all_aliases().collect();
                assert_eq!(aliases, want, "aliases of {name}");
            }
        }
        assert_eq!(
            full.get_subcommands().count(),
            15,
            "update subcommand() for a new subcommand"
        );
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
