//! What the daemon remembers of each sandbox and container, and the CRI
//! views built from it.

use std::collections::HashMap;
use std::path::PathBuf;

use k8s_cri::v1 as cri;
use serde::{Deserialize, Serialize};

use super::records::Keyed;
use crate::monitor::{ExitInfo, ExitReason};
use crate::sandbox::SandboxState;

/// A pod sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Sandbox ID.
    pub id: String,
    /// The config RunPodSandbox was given.
    pub config: cri::PodSandboxConfig,
    /// The handler that runs its containers.
    pub runtime_handler: String,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    /// False once stopped.
    pub ready: bool,
    /// Namespaces, files and network, for stop and teardown.
    pub state: SandboxState,
}

impl Keyed for SandboxRecord {
    fn id(&self) -> &str {
        &self.id
    }
}

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Created, not started.
    Created,
    /// Started and not known to have exited.
    Running,
    /// Exited (or never started and failed).
    Exited,
}

impl Phase {
    /// The CRI enum value.
    pub fn cri(self) -> i32 {
        match self {
            Phase::Created => cri::ContainerState::ContainerCreated as i32,
            Phase::Running => cri::ContainerState::ContainerRunning as i32,
            Phase::Exited => cri::ContainerState::ContainerExited as i32,
        }
    }
}

/// A container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Container ID.
    pub id: String,
    /// Its sandbox.
    pub sandbox_id: String,
    /// The config CreateContainer was given.
    pub config: cri::ContainerConfig,
    /// The image as the user named it.
    pub image: String,
    /// Image ID (config digest).
    pub image_id: String,
    /// A repo digest of the image, else its ID (what ContainerStatus shows).
    pub image_ref: String,
    /// The reserved name (`name_pod_namespace_uid_attempt`).
    pub name: String,
    /// Runtime handler name.
    pub runtime_handler: String,
    /// Runtime binary and root.
    pub runtime: PathBuf,
    /// The runtime's `--root`.
    pub runtime_root: PathBuf,
    /// Bundle directory (config.json, rootfs).
    pub bundle: PathBuf,
    /// Writable layer (`upper`, `work`).
    pub layer_dir: PathBuf,
    /// The monitor's state directory.
    pub monitor_dir: PathBuf,
    /// The CRI log file.
    pub log_path: PathBuf,
    /// Signal StopContainer sends first (image `StopSignal`).
    pub stop_signal: String,
    /// Nanoseconds since the epoch; 0 = not yet.
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub phase: Phase,
    /// Container init pid while it runs.
    pub pid: i32,
}

impl Keyed for ContainerRecord {
    fn id(&self) -> &str {
        &self.id
    }
}

impl ContainerRecord {
    /// Folds the monitor's exit record in; returns whether anything changed.
    pub fn apply_exit(&mut self, exit: &ExitInfo) -> bool {
        if self.phase == Phase::Exited {
            return false;
        }
        self.phase = Phase::Exited;
        self.exit_code = exit.exit_code;
        self.finished_at = exit.finished_at.timestamp_nanos_opt().unwrap_or_default();
        self.reason = match exit.reason {
            ExitReason::Completed => "Completed",
            ExitReason::Error => "Error",
            ExitReason::OomKilled => "OOMKilled",
            ExitReason::CreateFailed => "CreateFailed",
        }
        .to_owned();
        self.message = exit.message.clone().unwrap_or_default();
        self.pid = 0;
        true
    }

    /// ListContainers' view.
    pub fn summary(&self) -> cri::Container {
        cri::Container {
            id: self.id.clone(),
            pod_sandbox_id: self.sandbox_id.clone(),
            metadata: self.config.metadata.clone(),
            image: Some(image_spec(&self.image)),
            image_ref: self.image_ref.clone(),
            state: self.phase.cri(),
            created_at: self.created_at,
            labels: self.config.labels.clone(),
            annotations: self.config.annotations.clone(),
            image_id: self.image_id.clone(),
        }
    }

    /// ContainerStatus' view.
    pub fn status(&self) -> cri::ContainerStatus {
        cri::ContainerStatus {
            id: self.id.clone(),
            metadata: self.config.metadata.clone(),
            state: self.phase.cri(),
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            exit_code: self.exit_code,
            image: Some(image_spec(&self.image)),
            image_ref: self.image_ref.clone(),
            reason: self.reason.clone(),
            message: self.message.clone(),
            labels: self.config.labels.clone(),
            annotations: self.config.annotations.clone(),
            mounts: self.config.mounts.clone(),
            log_path: self.log_path.display().to_string(),
            resources: self
                .config
                .linux
                .as_ref()
                .and_then(|l| l.resources.clone())
                .map(|linux| cri::ContainerResources {
                    linux: Some(linux),
                    windows: None,
                }),
            image_id: self.image_id.clone(),
            user: None,
        }
    }
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        annotations: HashMap::new(),
        user_specified_image: image.to_owned(),
        runtime_handler: String::new(),
    }
}

impl SandboxRecord {
    /// The CRI state value.
    pub fn cri_state(&self) -> i32 {
        if self.ready {
            cri::PodSandboxState::SandboxReady as i32
        } else {
            cri::PodSandboxState::SandboxNotready as i32
        }
    }

    /// ListPodSandbox's view.
    pub fn summary(&self) -> cri::PodSandbox {
        cri::PodSandbox {
            id: self.id.clone(),
            metadata: self.config.metadata.clone(),
            state: self.cri_state(),
            created_at: self.created_at,
            labels: self.config.labels.clone(),
            annotations: self.config.annotations.clone(),
            runtime_handler: self.runtime_handler.clone(),
        }
    }

    /// PodSandboxStatus' view.
    pub fn status(&self) -> cri::PodSandboxStatus {
        let mut ips = self.state.pod_ips.iter().map(ToString::to_string);
        let network = cri::PodSandboxNetworkStatus {
            ip: ips.next().unwrap_or_default(),
            additional_ips: ips.map(|ip| cri::PodIp { ip }).collect(),
        };
        let options = self
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        cri::PodSandboxStatus {
            id: self.id.clone(),
            metadata: self.config.metadata.clone(),
            state: self.cri_state(),
            created_at: self.created_at,
            network: Some(network),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace { options }),
            }),
            labels: self.config.labels.clone(),
            annotations: self.config.annotations.clone(),
            runtime_handler: self.runtime_handler.clone(),
        }
    }
}

/// Whether `labels` has every pair of `selector`.
pub fn matches_labels(
    labels: &HashMap<String, String>,
    selector: &HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// containerd's name reservation key: one container per (name, pod,
/// attempt).
pub fn container_name(config: &cri::ContainerConfig, sandbox: &cri::PodSandboxConfig) -> String {
    let c = config.metadata.clone().unwrap_or_default();
    let s = sandbox.metadata.clone().unwrap_or_default();
    format!(
        "{}_{}_{}_{}_{}",
        c.name, s.name, s.namespace, s.uid, c.attempt
    )
}

/// The name a sandbox reserves until it is removed (containerd's form).
pub fn sandbox_name(config: &cri::PodSandboxConfig) -> String {
    let s = config.metadata.clone().unwrap_or_default();
    format!("{}_{}_{}_{}", s.name, s.namespace, s.uid, s.attempt)
}

/// A RunPodSandbox or CreateContainer under way, written before it touches
/// the node: a daemon killed in the middle finds it at start and undoes
/// what was done, unless the finished record made it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Intent {
    /// The sandbox as planned (every path derives from its ID).
    Sandbox(Box<SandboxState>),
    /// The container record as it will be stored.
    Container(Box<ContainerRecord>),
}

impl Keyed for Intent {
    fn id(&self) -> &str {
        match self {
            Intent::Sandbox(state) => &state.id,
            Intent::Container(record) => &record.id,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn label_selector_needs_every_pair() {
        let labels: HashMap<String, String> =
            [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        assert!(matches_labels(&labels, &HashMap::new()));
        assert!(matches_labels(&labels, &[("a".into(), "1".into())].into()));
        assert!(!matches_labels(&labels, &[("a".into(), "2".into())].into()));
        assert!(!matches_labels(&labels, &[("c".into(), "1".into())].into()));
    }

    #[test]
    fn names_follow_containerd() {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "app".into(),
                attempt: 2,
            }),
            ..Default::default()
        };
        let sandbox = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                uid: "u1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            ..Default::default()
        };
        assert_eq!(container_name(&config, &sandbox), "app_web_default_u1_2");
        assert_eq!(sandbox_name(&sandbox), "web_default_u1_0");
    }
}
