//! create, start, run, state, kill, delete, pause, resume.

use libcgroups::common::{CgroupManager, FreezerState};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{self, SigSet};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{absolute, observe, status_name, Ctx};
use crate::bundle::{self, ProcessLimits};
use crate::cli::{CreateArgs, DeleteArgs, KillArgs, RunArgs};
use crate::start_hooks::{self, StartHooks};
use crate::state::ContainerState;
use crate::tty::ConsoleSocket;
use crate::Error;
use crate::{effective, poststart, propagation};

/// Builds the container (init waiting on start) per the bundle.
fn build(
    ctx: &Ctx,
    a: &CreateArgs,
    console_socket: Option<&std::path::Path>,
) -> Result<Container, Error> {
    let bundle = absolute(&a.bundle)?;
    let mut spec = bundle::validate(&bundle, &ProcessLimits)?;
    ctx.ensure_root()?;
    if ctx.container_dir(&a.id).exists() {
        return Err(Error::Exists { id: a.id.clone() });
    }
    let fixes = propagation::fixes(&spec);
    let effective = if effective::normalize(&mut spec, &a.id, ctx.systemd_cgroup) {
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_default();
        let rootfs = crate::state::rootfs_path(&bundle, &root);
        let dir = effective::write(&ctx.root, &a.id, &bundle, &rootfs, &mut spec).map_err(|e| {
            Error::io(
                "writing effective bundle",
                effective::dir(&ctx.root, &a.id),
                e,
            )
        })?;
        Some(dir)
    } else {
        None
    };
    if !a.no_new_keyring {
        join_session_keyring(&a.id)?;
    }
    let console_socket = console_socket.or(a.console_socket.as_deref());
    let hooks = StartHooks::new(&a.id, &bundle, a.preserve_fds);
    let built = ContainerBuilder::new(a.id.clone(), SyscallType::default())
        .with_executor(hooks)
        .with_root_path(&ctx.root)
        .and_then(|b| b.with_pid_file(a.pid_file.as_ref()))
        .map(|b| {
            b.with_console_socket(console_socket)
                .with_preserved_fds(a.preserve_fds)
        })
        .and_then(|b| b.validate_id())
        .and_then(|b| {
            b.as_init(effective.as_deref().unwrap_or(&bundle))
                .with_systemd(ctx.systemd_cgroup)
                // libcontainer only uses `detach` to demand a console socket
                // for terminals; foreground runs hand it our own socket.
                .with_detach(true)
                .with_no_pivot(a.no_pivot)
                .build()
        });
    let mut c = match built {
        Ok(c) => c,
        Err(e) => {
            effective::remove(&ctx.root, &a.id);
            return Err(Error::lib("creating", &a.id, e));
        }
    };
    let applied = match c.pid() {
        Some(pid) => propagation::apply(pid.as_raw(), &fixes),
        None => Ok(()),
    };
    if let Err(e) = applied.map_err(Error::from) {
        let _ = c.delete(true);
        effective::remove(&ctx.root, &a.id);
        return Err(e);
    }
    Ok(c)
}

/// Gives the container its own session keyring, named after it, as runc does
/// unless `--no-new-keyring`: init inherits ours, and libcontainer makes none,
/// so without this every container would share the caller's keys.
fn join_session_keyring(id: &str) -> Result<(), Error> {
    const KEYCTL_JOIN_SESSION_KEYRING: nix::libc::c_long = 1;
    let name = std::ffi::CString::new(id)
        .map_err(|_| Error::Invalid(format!("container id {id:?} contains a NUL byte")))?;
    // SAFETY: keyctl(2) with a valid NUL-terminated name; no memory is shared.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            name.as_ptr(),
        )
    };
    match nix::errno::Errno::result(r) {
        Ok(_) => Ok(()),
        // Kernels without keys, as runc tolerates.
        Err(nix::errno::Errno::ENOSYS) => Ok(()),
        Err(source) => Err(Error::Sys {
            what: "joining a new session keyring",
            source,
        }),
    }
}

pub fn create(ctx: &Ctx, a: &CreateArgs) -> Result<i32, Error> {
    build(ctx, a, None)?;
    Ok(0)
}

/// Lets init exec the user process, then runs the poststart hooks.
fn start_and_poststart(c: &mut Container) -> Result<(), Error> {
    let init_exe = c.pid().and_then(|p| poststart::exe_of(p.as_raw()));
    start_hooks::start(c)?;
    poststart::run(c, init_exe);
    Ok(())
}

pub fn start(ctx: &Ctx, id: &str) -> Result<i32, Error> {
    let mut c = ctx.load(id)?;
    if c.status() != ContainerStatus::Created {
        return Err(match c.status() {
            ContainerStatus::Stopped => {
                Error::Invalid("cannot start a container that has stopped".into())
            }
            s => Error::Invalid(format!(
                "cannot start an already running container (status {})",
                status_name(s)
            )),
        });
    }
    start_and_poststart(&mut c)?;
    Ok(0)
}

pub fn run(ctx: &Ctx, a: &RunArgs) -> Result<i32, Error> {
    let terminal =
        !a.detach && a.create.console_socket.is_none() && spec_wants_terminal(&a.create.bundle);
    // Foreground: reparented container processes must come back to us so we
    // can reap init and report its status, as runc's subreaper does.
    if !a.detach && !a.no_subreaper {
        set_subreaper()?;
    }
    let tmp = if terminal { Some(private_dir()?) } else { None };
    let console = match &tmp {
        Some(dir) => Some(ConsoleSocket::bind(dir.path())?),
        None => None,
    };
    // Block signals before init exists so none is lost before we forward them.
    let signals = SigSet::all();
    if !a.detach {
        signals.thread_block().map_err(|source| Error::Sys {
            what: "blocking signals",
            source,
        })?;
    }
    let mut c = build(ctx, &a.create, console.as_ref().map(ConsoleSocket::path))?;
    let master = match &console {
        Some(cs) => Some(cs.receive_master()?),
        None => None,
    };
    if let Err(e) = start_and_poststart(&mut c) {
        let _ = c.delete(true);
        effective::remove(&ctx.root, &a.create.id);
        return Err(e);
    }
    if a.detach {
        return Ok(0);
    }
    let Some(pid) = c.pid() else {
        return Err(Error::Invalid(format!(
            "container {} has no init pid",
            a.create.id
        )));
    };
    let relay = master.map(|m| std::thread::spawn(move || crate::tty::relay(m)));
    let status = forward_until_exit(pid, &signals)?;
    if let Some(r) = relay {
        let _ = r.join();
    }
    if !a.keep {
        c.delete(true)
            .map_err(|e| Error::lib("deleting", &a.create.id, e))?;
        effective::remove(&ctx.root, &a.create.id);
    }
    Ok(status)
}

fn spec_wants_terminal(bundle: &std::path::Path) -> bool {
    std::fs::read_to_string(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["process"]["terminal"].as_bool())
        .unwrap_or(false)
}

pub(super) fn private_dir() -> Result<tempfile::TempDir, Error> {
    tempfile::Builder::new()
        .prefix("bosun-runc-")
        .tempdir()
        .map_err(|e| Error::io("creating temp dir in", std::env::temp_dir(), e))
}

pub(super) fn set_subreaper() -> Result<(), Error> {
    nix::sys::prctl::set_child_subreaper(true).map_err(|source| Error::Sys {
        what: "becoming child subreaper",
        source,
    })
}

/// Forwards signals to `pid` and reaps children until it exits; returns its
/// exit status, 128+signal when killed, as a shell reports it.
pub(super) fn forward_until_exit(pid: Pid, signals: &SigSet) -> Result<i32, Error> {
    loop {
        // A child may have exited before we started waiting: reap first.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, code)) if p == pid => return Ok(code),
                Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => return Ok(128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(source) => {
                    return Err(Error::Sys {
                        what: "waiting for container",
                        source,
                    })
                }
            }
        }
        match signals.wait() {
            Ok(signal::SIGCHLD) | Ok(signal::SIGURG) => {}
            Ok(signal::SIGWINCH) => {}
            Ok(sig) => {
                let _ = signal::kill(pid, sig);
            }
            Err(source) => {
                return Err(Error::Sys {
                    what: "waiting for signals",
                    source,
                })
            }
        }
    }
}

pub fn state(ctx: &Ctx, id: &str) -> Result<i32, Error> {
    let c = ctx.load(id)?;
    let s = ContainerState::from_observed(&observe(&c));
    let json = serde_json::to_string_pretty(&s)
        .map_err(|e| Error::Invalid(format!("encoding state of {id}: {e}")))?;
    println!("{json}");
    Ok(0)
}

/// Signals the container without libcontainer's `Container::kill`, which
/// records "stopped" after any signal (a SIGWINCH would make a created
/// container unstartable). State here only ever reflects the kernel's truth.
pub fn kill(ctx: &Ctx, a: &KillArgs) -> Result<i32, Error> {
    let signal = crate::cli::parse_signal(&a.signal)
        .ok_or_else(|| Error::Invalid(format!("invalid signal {:?}", a.signal)))?;
    let c = ctx.load(&a.id)?;
    let status = c.status();
    if a.all {
        // As runc: with --all, leftover processes of a stopped container
        // still get the signal while its cgroup exists.
        let cg = ctx.cgroup_manager(&c)?;
        let pids = cg.get_all_pids().unwrap_or_default();
        if pids.is_empty() && status == ContainerStatus::Stopped {
            return Err(Error::NotRunning { id: a.id.clone() });
        }
        // Frozen, nothing can fork between listing and signalling.
        let paused = status == ContainerStatus::Paused;
        if !paused {
            let _ = cg.freeze(FreezerState::Frozen);
        }
        let pids = cg.get_all_pids().unwrap_or(pids);
        for pid in pids {
            let _ = signal::kill(pid, signal);
        }
        if !paused || signal == signal::SIGKILL {
            let _ = cg.freeze(FreezerState::Thawed);
        }
        return Ok(0);
    }
    let pid = match (status, c.pid()) {
        (ContainerStatus::Stopped, _) | (_, None) => {
            return Err(Error::NotRunning { id: a.id.clone() })
        }
        (_, Some(pid)) => pid,
    };
    match signal::kill(pid, signal) {
        Ok(()) => {}
        Err(nix::errno::Errno::ESRCH) => return Err(Error::NotRunning { id: a.id.clone() }),
        Err(source) => {
            return Err(Error::Sys {
                what: "sending signal",
                source,
            })
        }
    }
    // A frozen (v1) process cannot act on SIGKILL until thawed.
    if status == ContainerStatus::Paused && signal == signal::SIGKILL {
        let _ = ctx.cgroup_manager(&c)?.freeze(FreezerState::Thawed);
    }
    Ok(0)
}

pub fn delete(ctx: &Ctx, a: &DeleteArgs) -> Result<i32, Error> {
    let mut c = match ctx.load(&a.id) {
        Ok(c) => c,
        // runc: `delete --force` of a container that is gone is not an error.
        Err(Error::NotFound { .. }) if a.force => {
            let _ = std::fs::remove_dir_all(ctx.container_dir(&a.id));
            effective::remove(&ctx.root, &a.id);
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    match c.status() {
        ContainerStatus::Running | ContainerStatus::Paused | ContainerStatus::Creating
            if !a.force =>
        {
            Err(Error::NotStopped {
                id: a.id.clone(),
                status: status_name(c.status()),
            })
        }
        _ => {
            c.delete(a.force)
                .map_err(|e| Error::lib("deleting", &a.id, e))?;
            effective::remove(&ctx.root, &a.id);
            Ok(0)
        }
    }
}

pub fn pause(ctx: &Ctx, id: &str) -> Result<i32, Error> {
    let mut c = ctx.load(id)?;
    if !c.can_pause() {
        return Err(Error::NotRunning { id: id.to_string() });
    }
    c.pause().map_err(|e| Error::lib("pausing", id, e))?;
    Ok(0)
}

pub fn resume(ctx: &Ctx, id: &str) -> Result<i32, Error> {
    let mut c = ctx.load(id)?;
    if !c.can_resume() {
        return Err(Error::Invalid("container not paused".into()));
    }
    c.resume().map_err(|e| Error::lib("resuming", id, e))?;
    Ok(0)
}
