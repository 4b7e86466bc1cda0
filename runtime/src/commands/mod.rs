//! One function per runc command. Each returns the process exit code on
//! success (0, or the container process's status for foreground run/exec).

mod exec;
mod info;
mod lifecycle;

use std::path::{Path, PathBuf};

use libcontainer::container::state::State;
use libcontainer::container::Container;

pub use exec::exec;
pub use info::{events, features, list, ps, spec, update};
pub use lifecycle::{create, delete, kill, pause, resume, run, start, state};

use crate::state::{rootfs_path, Observed};
use crate::Error;

/// What every command needs from the global flags.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub root: PathBuf,
    pub systemd_cgroup: bool,
}

impl Ctx {
    fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Makes sure the state root exists, private to root as runc keeps it.
    fn ensure_root(&self) -> Result<(), Error> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| Error::io("creating state root", &self.root, e))
    }

    fn load(&self, id: &str) -> Result<Container, Error> {
        let dir = self.container_dir(id);
        if !State::file_path(&dir).exists() {
            return Err(Error::NotFound { id: id.to_string() });
        }
        Container::load(dir).map_err(|e| Error::lib("loading", id, e))
    }

    fn cgroup_manager(&self, c: &Container) -> Result<libcgroups::common::AnyCgroupManager, Error> {
        let config = c
            .spec()
            .map_err(|e| Error::lib("loading config of", c.id(), e))?;
        libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path: config.cgroup_path,
            systemd_cgroup: c.systemd(),
            container_name: c.id().to_string(),
        })
        .map_err(|e| Error::Invalid(format!("cgroup of container {}: {e}", c.id())))
    }
}

/// Reads what `state`/`list` report. The rootfs comes from the bundle's config,
/// falling back to `<bundle>/rootfs` when the bundle is gone.
fn observe(c: &Container) -> Observed {
    let config_dir = c.bundle().clone();
    let bundle = crate::effective::origin(&config_dir).unwrap_or_else(|| config_dir.clone());
    let root = std::fs::read_to_string(config_dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["root"]["path"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    Observed {
        id: c.id().to_string(),
        pid: c.pid().map(|p| p.as_raw()),
        status: status_name(c.status()),
        rootfs: rootfs_path(&bundle, &root),
        bundle,
        created: c.created(),
        annotations: c.state.annotations.clone(),
        owner: String::new(),
    }
}

/// runc's lowercase status words ("created", "running", ...); libcontainer's
/// Display capitalises them, its serde names do not.
fn status_name(s: libcontainer::container::ContainerStatus) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| s.to_string().to_lowercase())
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("#{uid}"))
}

fn absolute(p: &Path) -> Result<PathBuf, Error> {
    std::path::absolute(p).map_err(|e| Error::io("resolving", p, e))
}
