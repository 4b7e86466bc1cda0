//! CRI RuntimeService: sandboxes and containers.
//!
//! State lives in [`Records`] behind one mutex held only for lookups and
//! updates; the slow parts (CNI, mounting, the runtime binary, waiting for
//! an exit) run without it, on blocking threads.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::config::{CgroupDriver, Config};
use super::exec_process;
use super::images::{status_of, ImageUsers};
use super::metrics;
use super::records::Records;
use super::rootfs;
use super::state::{
    container_name, matches_labels, sandbox_name, ContainerRecord, Intent, Phase, SandboxRecord,
};
use super::stats;
use super::streaming::{AttachSpec, ExecSpec, Pending, PortForwardSpec, Streaming};
use crate::image::reference::Digest;
use crate::image::service::ImageService;
use crate::image::unpack::snapshot_path;
use crate::monitor::{self, SpawnOptions};
use crate::sandbox::{self, SandboxRequest, Settings};
use crate::spec::{self, Host, ImageContext, SandboxContext};

/// The runtime's name in Version.
pub const RUNTIME_NAME: &str = "bosun";
/// How long `runtime create` may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long StopContainer waits for SIGKILL to take effect.
const KILL_GRACE: Duration = Duration::from_secs(10);
/// How often exits recorded by monitors are looked for.
const EXIT_POLL: Duration = Duration::from_millis(250);
/// How long a timed-out ExecSync waits for the runtime to reap the command
/// it killed.
const EXEC_REAP_GRACE: Duration = Duration::from_secs(2);

struct Tables {
    sandboxes: Records<SandboxRecord>,
    containers: Records<ContainerRecord>,
    /// Creates under way (see [`Intent`]).
    intents: Records<Intent>,
    /// Names of sandboxes and containers being created.
    reserved: HashSet<String>,
    /// Containers inside StartContainer: exits are not folded in until
    /// it marked them running, so a quick exit cannot be undone by it.
    starting: HashSet<String>,
}

impl Tables {
    /// Claims `name` for a create under way, recording `intent` first;
    /// AlreadyExists when a sandbox or container has it.
    fn reserve(&mut self, name: &str, intent: Intent) -> Result<(), Status> {
        let holder = self
            .sandboxes
            .all()
            .find(|s| sandbox_name(&s.config) == name)
            .map(|s| s.id.clone())
            .or_else(|| {
                let container = self.containers.all().find(|c| c.name == name);
                container.map(|c| c.id.clone())
            });
        if let Some(holder) = holder {
            return Err(Status::already_exists(format!(
                "name {name} is reserved for {holder}"
            )));
        }
        if self.reserved.contains(name) {
            return Err(Status::already_exists(format!(
                "name {name} is being used by a create under way"
            )));
        }
        self.intents.put(intent).map_err(internal)?;
        self.reserved.insert(name.to_owned());
        Ok(())
    }

    /// Ends a create: the name is the record's now, or free again.
    fn release(&mut self, name: &str, id: &str) {
        self.reserved.remove(name);
        if let Err(e) = self.intents.remove(id) {
            tracing::warn!("{e}");
        }
    }
}

/// The RuntimeService and the state behind it.
pub struct Runtime {
    config: Config,
    daemon_dir: Option<PathBuf>,
    images: ImageService,
    settings: Settings,
    host: Host,
    monitor: PathBuf,
    tables: Mutex<Tables>,
    events: broadcast::Sender<cri::ContainerEventResponse>,
    streaming: Arc<Streaming>,
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
}

fn random_id() -> Result<String, Status> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| Status::internal(format!("read /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Scratch files of one exec, removed when it ends however it ends.
struct ExecFiles([PathBuf; 2]);

impl Drop for ExecFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// SIGKILLs the process an exec started, by the pid its runtime recorded.
fn kill_exec_process(pid_file: &Path) {
    let pid = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 0);
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The streams an Exec or Attach asks for, as the kubelet validates them.
fn check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Result<(), Status> {
    if !(stdin || stdout || stderr) {
        return Err(Status::invalid_argument(
            "one of stdin, stdout and stderr must be set",
        ));
    }
    if tty && stderr {
        return Err(Status::invalid_argument(
            "tty and stderr cannot both be set (a tty merges them)",
        ));
    }
    Ok(())
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker thread: {e}")))?
}

/// Runs the OCI runtime binary; the error carries its stderr.
fn run_runtime(runtime: &Path, root: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = std::process::Command::new(runtime)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .map_err(|e| format!("run {}: {e}", runtime.display()))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "{} {}: {}",
            runtime.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Runtime {
    /// Loads the records under `config.root` and reconciles containers with
    /// their monitors (exits that happened while the daemon was down).
    pub fn new(
        config: Config,
        images: ImageService,
        daemon_dir: Option<PathBuf>,
        streaming: Arc<Streaming>,
    ) -> Result<Arc<Self>, String> {
        let cni = sandbox::cni::Cni::new(
            config.cni_conf_dir.clone(),
            config.cni_bin_dirs.clone(),
            config.state.join("cni"),
        );
        let settings = Settings::new(config.state.join("ns"), config.state.clone(), cni);
        let monitor = super::config::find_binary(
            config
                .monitor
                .as_deref()
                .unwrap_or(Path::new("bosun-cri-monitor")),
            daemon_dir.as_deref(),
        );
        let host = spec::Host::detect(
            config.cgroup_driver == CgroupDriver::Systemd,
            config.seccomp_profile_root.clone(),
        );
        let tables = Tables {
            sandboxes: Records::load(&config.root.join("sandboxes")).map_err(|e| e.to_string())?,
            containers: Records::load(&config.root.join("containers"))
                .map_err(|e| e.to_string())?,
            intents: Records::load(&config.root.join("intents")).map_err(|e| e.to_string())?,
            reserved: HashSet::new(),
            starting: HashSet::new(),
        };
        let (events, _) = broadcast::channel(256);
        let runtime = Arc::new(Self {
            config,
            daemon_dir,
            images,
            settings,
            host,
            monitor,
            tables: Mutex::new(tables),
            events,
            streaming,
        });
        runtime.undo_intents();
        runtime.reconcile();
        Ok(runtime)
    }

    /// Undoes the creates a killed daemon left half done.
    fn undo_intents(&self) {
        let mut tables = self.tables();
        let intents: Vec<Intent> = tables.intents.all().cloned().collect();
        for intent in intents {
            let undone = match &intent {
                Intent::Sandbox(state) if tables.sandboxes.get(&state.id).is_none() => {
                    sandbox::teardown(state, &self.settings).map_err(|e| e.to_string())
                }
                Intent::Container(record) if tables.containers.get(&record.id).is_none() => {
                    // A create still running under the monitor would bring
                    // back what is removed now: let it finish first.
                    let deadline = Instant::now() + CREATE_TIMEOUT;
                    let pid_file = record.monitor_dir.join(monitor::CONTAINER_PID_FILE);
                    while monitor::is_alive(&record.monitor_dir)
                        && !pid_file.exists()
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Self::remove_blocking(record).map_err(|e| e.message().to_owned())
                }
                // The record made it: the create finished.
                _ => Ok(()),
            };
            let id = super::records::Keyed::id(&intent).to_owned();
            match undone.and_then(|()| tables.intents.remove(&id).map_err(|e| e.to_string())) {
                Ok(()) => {
                    tracing::info!(id = %id, "undid a create the previous daemon left half done")
                }
                Err(e) => tracing::warn!(id = %id, "undo a half-done create: {e}"),
            }
        }
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock leaves consistent records (every
        // update is one put); keep serving.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Folds exits recorded by monitors into container records; each exit
    /// seen for the first time is reported as a stopped event.
    fn reconcile(&self) {
        let mut tables = self.tables();
        let mut stopped = Vec::new();
        let ids: Vec<String> = tables
            .containers
            .all()
            .filter(|c| c.phase != Phase::Exited && !tables.starting.contains(&c.id))
            .map(|c| c.id.clone())
            .collect();
        for id in ids {
            let Some(mut record) = tables.containers.get(&id).cloned() else {
                continue;
            };
            let exit = monitor::read_exit(&record.monitor_dir);
            let gone = matches!(exit, Ok(None))
                && record.phase == Phase::Running
                && !monitor::is_alive(&record.monitor_dir);
            // Read again once the monitor is gone: it records the exit
            // right before exiting, so it may have done both since.
            let exit = if gone {
                monitor::read_exit(&record.monitor_dir)
            } else {
                exit
            };
            if let Ok(Some(exit)) = exit {
                if !record.apply_exit(&exit) {
                    continue;
                }
            } else if gone {
                // The monitor died without recording an exit (e.g. killed
                // with the node): the container cannot be watched any more.
                record.phase = Phase::Exited;
                record.exit_code = 255;
                record.reason = "Unknown".into();
                record.message = "container monitor is gone".into();
                record.finished_at = now_ns();
            } else {
                continue;
            }
            if tables.containers.put(record.clone()).is_ok() {
                stopped.push(record);
            }
        }
        drop(tables);
        self.emit_stopped(stopped);
    }

    /// Stopped events for containers whose exit was just recorded.
    fn emit_stopped(&self, records: Vec<ContainerRecord>) {
        for record in records {
            let sandbox = self.sandbox(&record.sandbox_id);
            self.emit(
                &record.id,
                cri::ContainerEventType::ContainerStoppedEvent,
                sandbox.as_ref(),
                vec![record.status()],
            );
        }
    }

    /// Notices containers that exit by themselves (their monitors record
    /// it) every [`EXIT_POLL`], so their stopped events come unasked, as
    /// from containerd's task exit events. Ends when the runtime is dropped.
    pub fn watch_exits(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let runtime = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(EXIT_POLL).await;
                let Some(runtime) = runtime.upgrade() else {
                    return;
                };
                // File reads under the tables lock: off the async workers.
                let _ = tokio::task::spawn_blocking(move || runtime.reconcile()).await;
            }
        })
    }

    fn emit(
        &self,
        container_id: &str,
        kind: cri::ContainerEventType,
        sandbox: Option<&SandboxRecord>,
        containers: Vec<cri::ContainerStatus>,
    ) {
        let _ = self.events.send(cri::ContainerEventResponse {
            container_id: container_id.to_owned(),
            container_event_type: kind as i32,
            created_at: now_ns(),
            pod_sandbox_status: sandbox.map(SandboxRecord::status),
            containers_statuses: containers,
        });
    }

    fn handler(&self, name: &str) -> Result<(String, PathBuf, PathBuf), Status> {
        let (name, handler) = self.config.handler(name).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown runtime handler {name:?}; configured: {:?}",
                self.config.runtimes.keys().collect::<Vec<_>>()
            ))
        })?;
        let path = super::config::find_binary(&handler.path, self.daemon_dir.as_deref());
        Ok((name.to_owned(), path, handler.root.clone()))
    }

    fn sandbox(&self, id: &str) -> Option<SandboxRecord> {
        self.tables().sandboxes.resolve(id).cloned()
    }

    /// A sandbox by ID or unique prefix; NotFound otherwise.
    fn known_sandbox(&self, id: &str) -> Result<SandboxRecord, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("pod sandbox ID is required"));
        }
        self.sandbox(id)
            .ok_or_else(|| Status::not_found(format!("pod sandbox {id} not found")))
    }

    /// A container by ID or unique prefix; NotFound otherwise, as the
    /// kubelet expects.
    fn known_container(&self, id: &str) -> Result<ContainerRecord, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("container ID is required"));
        }
        self.container(id)
            .ok_or_else(|| Status::not_found(format!("container {id} not found")))
    }

    /// Like [`Self::known_sandbox`], and it must be ready (not stopped).
    fn ready_sandbox(&self, id: &str) -> Result<SandboxRecord, Status> {
        let sandbox = self.known_sandbox(id)?;
        if !sandbox.ready {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        Ok(sandbox)
    }

    /// Like [`Self::known_container`], and it must be running.
    fn running_container(&self, id: &str) -> Result<ContainerRecord, Status> {
        let record = self.known_container(id)?;
        if record.phase != Phase::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                record.id
            )));
        }
        Ok(record)
    }

    fn container(&self, id: &str) -> Option<ContainerRecord> {
        self.reconcile_one(id);
        self.tables().containers.resolve(id).cloned()
    }

    fn reconcile_one(&self, id: &str) {
        let record = {
            let mut tables = self.tables();
            let Some(mut record) = tables.containers.resolve(id).cloned() else {
                return;
            };
            if record.phase == Phase::Exited || tables.starting.contains(&record.id) {
                return;
            }
            let Ok(Some(exit)) = monitor::read_exit(&record.monitor_dir) else {
                return;
            };
            if !record.apply_exit(&exit) || tables.containers.put(record.clone()).is_err() {
                return;
            }
            record
        };
        self.emit_stopped(vec![record]);
    }

    fn put_container(&self, record: ContainerRecord) -> Result<(), Status> {
        self.tables().containers.put(record).map_err(internal)
    }

    /// Stops a container: `signal`, then SIGKILL after `timeout`; waits for
    /// the monitor to record the exit.
    fn stop_blocking(record: &ContainerRecord, timeout: Duration) -> Result<(), Status> {
        if record.phase != Phase::Running {
            // Created but never started: nothing runs user code; kill the
            // waiting init so the monitor records an exit.
            if record.phase == Phase::Created {
                let _ = run_runtime(
                    &record.runtime,
                    &record.runtime_root,
                    &["kill", &record.id, "KILL"],
                );
            }
            return Ok(());
        }
        let signal = if record.stop_signal.is_empty() {
            "TERM"
        } else {
            record.stop_signal.as_str()
        };
        let exited = |deadline: Instant| loop {
            if matches!(monitor::read_exit(&record.monitor_dir), Ok(Some(_))) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !timeout.is_zero() {
            let _ = run_runtime(
                &record.runtime,
                &record.runtime_root,
                &["kill", &record.id, signal],
            );
            if exited(Instant::now() + timeout) {
                return Ok(());
            }
        }
        let _ = run_runtime(
            &record.runtime,
            &record.runtime_root,
            &["kill", "--all", &record.id, "KILL"],
        );
        if exited(Instant::now() + KILL_GRACE) {
            Ok(())
        } else {
            Err(Status::deadline_exceeded(format!(
                "container {} did not exit {} s after SIGKILL",
                record.id,
                KILL_GRACE.as_secs()
            )))
        }
    }

    /// Removes everything of a container but its record.
    fn remove_blocking(record: &ContainerRecord) -> Result<(), Status> {
        Self::stop_blocking(record, Duration::ZERO)?;
        if let Err(e) = run_runtime(
            &record.runtime,
            &record.runtime_root,
            &["delete", "--force", &record.id],
        ) {
            if !e.contains("does not exist") && !e.contains("not exist") {
                return Err(Status::internal(e));
            }
        }
        rootfs::unmount(&record.bundle.join("rootfs")).map_err(internal)?;
        for dir in [&record.bundle, &record.layer_dir, &record.monitor_dir] {
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir_all(parent);
            }
        }
        Ok(())
    }

    fn containers_of(&self, sandbox_id: &str) -> Vec<ContainerRecord> {
        self.tables()
            .containers
            .all()
            .filter(|c| c.sandbox_id == sandbox_id)
            .cloned()
            .collect()
    }

    /// Ready sandboxes that `keep` selects, each with its containers.
    fn ready_sandboxes(
        &self,
        keep: impl Fn(&SandboxRecord) -> bool,
    ) -> Vec<(SandboxRecord, Vec<ContainerRecord>)> {
        let tables = self.tables();
        tables
            .sandboxes
            .all()
            .filter(|s| s.ready && keep(s))
            .map(|s| {
                let containers = tables
                    .containers
                    .all()
                    .filter(|c| c.sandbox_id == s.id)
                    .cloned()
                    .collect();
                (s.clone(), containers)
            })
            .collect()
    }
}

impl ImageUsers for Runtime {
    fn containers_using(&self, image_id: &str) -> Vec<String> {
        self.tables()
            .containers
            .all()
            .filter(|c| c.image_id == image_id)
            .map(|c| c.id.clone())
            .collect()
    }
}

/// Makes bind mount sources that do not exist as directories (0755), as
/// containerd and CRI-O do: the kubelet leaves hostPath volumes of type ""
/// to the runtime. The spec checked that the paths are absolute.
fn make_missing_host_paths(mounts: &[cri::Mount]) -> Result<(), Status> {
    use std::os::unix::fs::DirBuilderExt;
    for mount in mounts {
        let path = Path::new(&mount.host_path);
        // Follows symlinks, as Go's os.Stat there: a dangling one fails.
        let made = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(path),
            other => other.map(drop),
        };
        made.map_err(|e| {
            Status::invalid_argument(format!(
                "mount host path {} for {}: {e}",
                path.display(),
                mount.container_path
            ))
        })?;
    }
    Ok(())
}

/// The parts of image configuration CreateContainer needs.
fn image_config(
    images: &ImageService,
    image_id: &str,
) -> Result<oci_spec::image::ImageConfiguration, Status> {
    let digest: Digest = image_id
        .parse()
        .map_err(|e| Status::internal(format!("image ID {image_id}: {e}")))?;
    let bytes = images.store().read_blob(&digest).map_err(internal)?;
    oci_spec::image::ImageConfiguration::from_reader(bytes.as_slice())
        .map_err(|e| Status::internal(format!("image config {image_id}: {e}")))
}

#[tonic::async_trait]
impl RuntimeService for Runtime {
    async fn version(
        &self,
        _request: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn status(
        &self,
        _request: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let cni = self.settings.cni.clone();
        let network = blocking(move || Ok(cni.status())).await?;
        let conditions = vec![
            cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: network.ready,
                reason: network.reason,
                message: network.message,
            },
        ];
        let runtime_handlers = self
            .config
            .runtimes
            .keys()
            .map(|name| cri::RuntimeHandler {
                name: name.clone(),
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: false,
                    user_namespaces: false,
                }),
            })
            .collect();
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info: HashMap::new(),
            runtime_handlers,
            features: None,
        }))
    }

    async fn runtime_config(
        &self,
        _request: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        let driver = match self.config.cgroup_driver {
            CgroupDriver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
            CgroupDriver::Systemd => cri::CgroupDriver::Systemd,
        };
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: driver as i32,
            }),
        }))
    }

    async fn update_runtime_config(
        &self,
        request: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        // The pod CIDR belongs to the CNI config on this node; note it.
        if let Some(cidr) = request
            .get_ref()
            .runtime_config
            .as_ref()
            .and_then(|c| c.network_config.as_ref())
            .map(|n| n.pod_cidr.clone())
        {
            tracing::info!(pod_cidr = %cidr, "kubelet reported the pod CIDR");
        }
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let request = request.into_inner();
        let config = request
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        let metadata = config
            .metadata
            .clone()
            .ok_or_else(|| Status::invalid_argument("config.metadata is required"))?;
        if metadata.name.is_empty() || metadata.namespace.is_empty() {
            return Err(Status::invalid_argument(
                "config.metadata.name and .namespace are required",
            ));
        }
        let (handler, _, _) = self.handler(&request.runtime_handler)?;
        let id = random_id()?;
        let planned = sandbox::SandboxState::plan(&id, &config, &self.settings)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = sandbox_name(&config);
        self.tables()
            .reserve(&name, Intent::Sandbox(Box::new(planned.clone())))?;
        let settings = self.settings.clone();
        let (sid, sconfig) = (id.clone(), config.clone());
        let set_up = blocking(move || {
            sandbox::setup(&SandboxRequest {
                id: &sid,
                config: &sconfig,
                settings: &settings,
            })
            .map_err(|e| Status::unknown(format!("set up pod sandbox {}: {e}", metadata.name)))
        })
        .await;
        let state = match set_up {
            Ok(state) => state,
            Err(e) => {
                // setup undid itself as far as it could; what is still
                // left stays in the intent for the next start.
                let settings = self.settings.clone();
                let undone = blocking(move || {
                    sandbox::teardown(&planned, &settings).map_err(|e| internal(e.to_string()))
                })
                .await;
                if undone.is_ok() {
                    self.tables().release(&name, &id);
                }
                return Err(e);
            }
        };
        let record = SandboxRecord {
            id: id.clone(),
            config,
            runtime_handler: handler,
            created_at: now_ns(),
            ready: true,
            state,
        };
        let stored = {
            let mut tables = self.tables();
            let stored = tables.sandboxes.put(record.clone());
            tables.release(&name, &id);
            stored
        };
        if let Err(e) = stored {
            let _ = sandbox::teardown(&record.state, &self.settings);
            return Err(internal(e));
        }
        tracing::info!(sandbox = %id, "pod sandbox running");
        self.emit(
            &id,
            cri::ContainerEventType::ContainerCreatedEvent,
            Some(&record),
            Vec::new(),
        );
        self.emit(
            &id,
            cri::ContainerEventType::ContainerStartedEvent,
            Some(&record),
            Vec::new(),
        );
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let Some(mut record) = self.sandbox(&request.get_ref().pod_sandbox_id) else {
            return Ok(Response::new(cri::StopPodSandboxResponse {}));
        };
        for container in self.containers_of(&record.id) {
            let id = container.id.clone();
            blocking(move || Runtime::stop_blocking(&container, Duration::ZERO)).await?;
            self.reconcile_one(&id);
        }
        let settings = self.settings.clone();
        let state = record.state.clone();
        blocking(move || {
            sandbox::stop(&state, &settings).map_err(|e| Status::unknown(e.to_string()))
        })
        .await?;
        record.ready = false;
        self.tables()
            .sandboxes
            .put(record.clone())
            .map_err(internal)?;
        self.emit(
            &record.id,
            cri::ContainerEventType::ContainerStoppedEvent,
            Some(&record),
            Vec::new(),
        );
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let Some(record) = self.sandbox(&request.get_ref().pod_sandbox_id) else {
            return Ok(Response::new(cri::RemovePodSandboxResponse {}));
        };
        for container in self.containers_of(&record.id) {
            let id = container.id.clone();
            blocking(move || Runtime::remove_blocking(&container)).await?;
            self.tables().containers.remove(&id).map_err(internal)?;
        }
        let settings = self.settings.clone();
        let state = record.state.clone();
        blocking(move || {
            sandbox::teardown(&state, &settings).map_err(|e| Status::unknown(e.to_string()))
        })
        .await?;
        self.tables()
            .sandboxes
            .remove(&record.id)
            .map_err(internal)?;
        self.emit(
            &record.id,
            cri::ContainerEventType::ContainerDeletedEvent,
            Some(&record),
            Vec::new(),
        );
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let request = request.into_inner();
        let record = self.known_sandbox(&request.pod_sandbox_id)?;
        let containers_statuses = self
            .containers_of(&record.id)
            .iter()
            .map(ContainerRecord::status)
            .collect();
        let mut info = HashMap::new();
        if request.verbose {
            info.insert(
                "info".to_owned(),
                serde_json::to_string(&record.state).unwrap_or_default(),
            );
        }
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(record.status()),
            info,
            containers_statuses,
            timestamp: now_ns(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let tables = self.tables();
        let items = tables
            .sandboxes
            .all()
            .filter(|s| filter.id.is_empty() || s.id.starts_with(&filter.id))
            .filter(|s| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|f| f.state == s.cri_state())
            })
            .filter(|s| matches_labels(&s.config.labels, &filter.label_selector))
            .map(SandboxRecord::summary)
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let request = request.into_inner();
        let sandbox = self.ready_sandbox(&request.pod_sandbox_id)?;
        let config = request
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        if config.metadata.as_ref().is_none_or(|m| m.name.is_empty()) {
            return Err(Status::invalid_argument("config.metadata.name is required"));
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| Status::invalid_argument("config.image.image is required"))?;
        let image = self
            .images
            .image_status(&image_name)
            .map_err(status_of)?
            .ok_or_else(|| {
                Status::not_found(format!("image {image_name} is not present; pull it first"))
            })?;
        let image_record = self
            .images
            .store()
            .get_image(&image.id)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("image {} vanished", image.id)))?;
        let name = container_name(&config, &sandbox.config);
        let (handler, runtime_path, runtime_root) = self.handler(&sandbox.runtime_handler)?;
        let id = random_id()?;
        // Kept short: the monitor's control socket lives in `monitor_dir`
        // and a unix socket path has 108 bytes at most.
        let state_dir = self.config.state.join("c").join(&id);
        let layer_dir = self.config.root.join("layers").join(&id);
        let bundle = state_dir.join("bundle");
        let monitor_dir = state_dir.join("m");
        let log_path = match (&sandbox.config.log_directory, &config.log_path) {
            (dir, path) if !dir.is_empty() && !path.is_empty() => Path::new(dir).join(path),
            _ => state_dir.join("container.log"),
        };
        let image_config = image_config(&self.images, &image.id)?;
        let stop_signal = image_config
            .config()
            .as_ref()
            .and_then(|c| c.stop_signal().clone())
            .unwrap_or_default();
        let lowers: Vec<PathBuf> = image_record
            .layers
            .iter()
            .rev()
            .map(|l| snapshot_path(self.images.store().snapshots_dir(), &l.chain_id))
            .collect();
        let image_ref = image
            .repo_digests
            .first()
            .cloned()
            .unwrap_or_else(|| image.id.clone());
        let mut record = ContainerRecord {
            id: id.clone(),
            sandbox_id: sandbox.id.clone(),
            config: config.clone(),
            image: image_name,
            image_id: image.id.clone(),
            image_ref,
            name: name.clone(),
            runtime_handler: handler,
            runtime: runtime_path.clone(),
            runtime_root: runtime_root.clone(),
            bundle: bundle.clone(),
            layer_dir: layer_dir.clone(),
            monitor_dir: monitor_dir.clone(),
            log_path: log_path.clone(),
            stop_signal,
            created_at: now_ns(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            phase: Phase::Created,
            pid: 0,
        };
        self.tables()
            .reserve(&name, Intent::Container(Box::new(record.clone())))?;

        let (host, monitor_bin) = (self.host.clone(), self.monitor.clone());
        let (cid, cconfig, sb) = (id.clone(), config.clone(), sandbox.clone());
        let (cbundle, clayer, cmonitor, clog) = (
            bundle.clone(),
            layer_dir.clone(),
            monitor_dir.clone(),
            log_path.clone(),
        );
        let (cruntime, croot) = (runtime_path.clone(), runtime_root.clone());
        let created = blocking(move || {
            let rootfs_dir = cbundle.join("rootfs");
            let cleanup = || {
                let _ = rootfs::unmount(&rootfs_dir);
                let _ = std::fs::remove_dir_all(cbundle.parent().unwrap_or(&cbundle));
                let _ = std::fs::remove_dir_all(&clayer);
            };
            let build = || -> Result<monitor::MonitorHandle, Status> {
                rootfs::mount_overlay(&lowers, &clayer, &rootfs_dir).map_err(internal)?;
                let files = &sb.state.files;
                let (hostname, resolv, hosts, shm) = (
                    files.hostname(),
                    files.resolv_conf(),
                    files.hosts(),
                    files.shm(),
                );
                let netns = sb.state.ns_path(sandbox::namespaces::NsKind::Net);
                let ipcns = sb.state.ns_path(sandbox::namespaces::NsKind::Ipc);
                let utsns = sb.state.ns_path(sandbox::namespaces::NsKind::Uts);
                let context = SandboxContext {
                    id: &sb.id,
                    config: &sb.config,
                    netns: netns.as_deref(),
                    ipcns: ipcns.as_deref(),
                    utsns: utsns.as_deref(),
                    pidns: sb.state.pid_ns_path(),
                    target_pidns: None,
                    hostname_file: Some(&hostname),
                    resolv_conf: Some(&resolv),
                    hosts_file: Some(&hosts),
                    shm: shm.as_deref(),
                };
                let spec = spec::container_spec(
                    &cid,
                    &context,
                    &cconfig,
                    &ImageContext {
                        config: &image_config,
                        rootfs: &rootfs_dir,
                    },
                    &host,
                )
                .map_err(|e| match e {
                    // A feature we lack, not a bad request (critest tells
                    // the two apart, e.g. for image volumes).
                    spec::SpecError::Unsupported { .. } => Status::unimplemented(e.to_string()),
                    _ => Status::invalid_argument(e.to_string()),
                })?;
                make_missing_host_paths(&cconfig.mounts)?;
                spec.save(cbundle.join("config.json")).map_err(internal)?;
                if let Some(parent) = clog.parent() {
                    std::fs::create_dir_all(parent).map_err(internal)?;
                }
                monitor::spawn(&SpawnOptions {
                    monitor: monitor_bin.clone(),
                    id: cid.clone(),
                    bundle: cbundle.clone(),
                    runtime: cruntime.clone(),
                    runtime_root: croot.clone(),
                    log_path: clog.clone(),
                    state_dir: cmonitor.clone(),
                    tty: cconfig.tty,
                    stdin: cconfig.stdin,
                    stdin_once: cconfig.stdin_once,
                    systemd_cgroup: host.systemd_cgroup,
                    timeout: CREATE_TIMEOUT,
                })
                .map_err(|e| Status::unknown(format!("create container: {e}")))
            };
            build().inspect_err(|_| cleanup())
        })
        .await;
        let created = match created {
            Ok(created) => created,
            Err(e) => {
                self.tables().release(&name, &id);
                return Err(e);
            }
        };
        record.pid = created.container_pid;
        if let Err(e) = self.put_container(record.clone()) {
            // The intent stays if even this fails: the next start retries.
            let leftover = record.clone();
            if blocking(move || Self::remove_blocking(&leftover))
                .await
                .is_ok()
            {
                self.tables().release(&name, &id);
            }
            return Err(e);
        }
        self.tables().release(&name, &id);
        self.emit(
            &id,
            cri::ContainerEventType::ContainerCreatedEvent,
            Some(&sandbox),
            vec![record.status()],
        );
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let record = self.known_container(&id)?;
        if record.phase != Phase::Created {
            return Err(Status::failed_precondition(format!(
                "container {} is {:?}, not created",
                record.id, record.phase
            )));
        }
        if !self.tables().starting.insert(record.id.clone()) {
            return Err(Status::failed_precondition(format!(
                "container {} is being started",
                record.id
            )));
        }
        let sandbox = self.sandbox(&record.sandbox_id);
        let (runtime, root, cid) = (
            record.runtime.clone(),
            record.runtime_root.clone(),
            record.id.clone(),
        );
        let started = blocking(move || {
            run_runtime(&runtime, &root, &["start", &cid]).map_err(Status::unknown)
        })
        .await;
        // Running and the started event under the lock, so the exit
        // watcher reports an exit only after them.
        let mut tables = self.tables();
        tables.starting.remove(&record.id);
        started?;
        let mut record = tables
            .containers
            .get(&record.id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("container {id} was removed")))?;
        record.started_at = now_ns();
        record.phase = Phase::Running;
        tables.containers.put(record.clone()).map_err(internal)?;
        self.emit(
            &record.id,
            cri::ContainerEventType::ContainerStartedEvent,
            sandbox.as_ref(),
            vec![record.status()],
        );
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let request = request.into_inner();
        let Some(record) = self.container(&request.container_id) else {
            return Ok(Response::new(cri::StopContainerResponse {}));
        };
        let timeout = Duration::from_secs(request.timeout.max(0).unsigned_abs());
        let id = record.id.clone();
        blocking(move || Runtime::stop_blocking(&record, timeout)).await?;
        // Emits the stopped event, unless the exit watcher already did.
        self.reconcile_one(&id);
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let Some(record) = self.container(&request.get_ref().container_id) else {
            return Ok(Response::new(cri::RemoveContainerResponse {}));
        };
        let id = record.id.clone();
        let sandbox = self.sandbox(&record.sandbox_id);
        let status = record.status();
        blocking(move || Runtime::remove_blocking(&record)).await?;
        self.tables().containers.remove(&id).map_err(internal)?;
        self.emit(
            &id,
            cri::ContainerEventType::ContainerDeletedEvent,
            sandbox.as_ref(),
            vec![status],
        );
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        self.reconcile();
        let filter = request.into_inner().filter.unwrap_or_default();
        let tables = self.tables();
        let containers = tables
            .containers
            .all()
            .filter(|c| filter.id.is_empty() || c.id.starts_with(&filter.id))
            .filter(|c| {
                filter.pod_sandbox_id.is_empty() || c.sandbox_id.starts_with(&filter.pod_sandbox_id)
            })
            .filter(|c| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|f| f.state == c.phase.cri())
            })
            .filter(|c| matches_labels(&c.config.labels, &filter.label_selector))
            .map(ContainerRecord::summary)
            .collect();
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let request = request.into_inner();
        let record = self.known_container(&request.container_id)?;
        let mut info = HashMap::new();
        if request.verbose {
            info.insert(
                "info".to_owned(),
                serde_json::json!({"pid": record.pid, "bundle": record.bundle, "runtime": record.runtime_handler}).to_string(),
            );
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(record.status()),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let request = request.into_inner();
        let mut record = self.known_container(&request.container_id)?;
        let Some(linux) = request.linux else {
            return Ok(Response::new(cri::UpdateContainerResourcesResponse {}));
        };
        let resources = spec::linux_resources(&linux, &self.host)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let file = record.bundle.with_file_name("resources.json");
        std::fs::write(&file, serde_json::to_vec(&resources).map_err(internal)?)
            .map_err(internal)?;
        if record.phase != Phase::Exited {
            let (runtime, root, id) = (
                record.runtime.clone(),
                record.runtime_root.clone(),
                record.id.clone(),
            );
            let path = file.display().to_string();
            blocking(move || {
                run_runtime(&runtime, &root, &["update", "-r", &path, &id]).map_err(Status::unknown)
            })
            .await?;
        }
        if let Some(config_linux) = record.config.linux.as_mut() {
            config_linux.resources = Some(linux);
        }
        self.put_container(record)?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let id = request.into_inner().container_id;
        let record = self.running_container(&id)?;
        let dir = record.monitor_dir.clone();
        blocking(move || monitor::reopen_log(&dir).map_err(internal)).await?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let request = request.into_inner();
        let record = self.running_container(&request.container_id)?;
        if request.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd is required"));
        }
        // The container's own process (user, groups, env, ...) with this
        // command, and where the runtime says which pid it got.
        let token = random_id()?;
        let dir = record.bundle.parent().unwrap_or(&record.bundle);
        let process_file = dir.join(format!("exec-{}.json", &token[..16]));
        let pid_file = dir.join(format!("exec-{}.pid", &token[..16]));
        let cleanup = ExecFiles([process_file.clone(), pid_file.clone()]);
        exec_process::write(&record.bundle, &request.cmd, false, &process_file)
            .map_err(internal)?;
        let mut command = tokio::process::Command::new(&record.runtime);
        command
            .arg("--root")
            .arg(&record.runtime_root)
            .arg("exec")
            .arg("--process")
            .arg(&process_file)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&record.id)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let run = command.output();
        tokio::pin!(run);
        let output = if request.timeout > 0 {
            let limit = Duration::from_secs(request.timeout.unsigned_abs());
            match tokio::time::timeout(limit, &mut run).await {
                Ok(output) => output,
                Err(_) => {
                    // Kill the command itself (killing only the runtime's
                    // exec would leave it running), then give the runtime
                    // a moment to reap it: if the runtime dies first, the
                    // zombie goes to the host's init, not the pod's.
                    kill_exec_process(&pid_file);
                    let _ = tokio::time::timeout(EXEC_REAP_GRACE, &mut run).await;
                    return Err(Status::deadline_exceeded(format!(
                        "command timed out after {} s",
                        request.timeout
                    )));
                }
            }
        } else {
            run.await
        }
        .map_err(internal)?;
        drop(cleanup);
        let exit_code = output.status.code().unwrap_or(255);
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: output.stdout,
            stderr: output.stderr,
            exit_code,
        }))
    }

    async fn exec(
        &self,
        request: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let request = request.into_inner();
        let record = self.running_container(&request.container_id)?;
        if request.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd is required"));
        }
        check_streams(request.stdin, request.stdout, request.stderr, request.tty)?;
        let url = self
            .streaming
            .url(Pending::Exec(ExecSpec {
                runtime: record.runtime,
                root: record.runtime_root,
                id: record.id,
                cmd: request.cmd,
                tty: request.tty,
                stdin: request.stdin,
                stdout: request.stdout,
                stderr: request.stderr,
            }))
            .map_err(internal)?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(
        &self,
        request: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let request = request.into_inner();
        let record = self.running_container(&request.container_id)?;
        check_streams(request.stdin, request.stdout, request.stderr, request.tty)?;
        if request.stdin && !record.config.stdin {
            return Err(Status::invalid_argument(format!(
                "container {} was not created with stdin open; attach without stdin",
                record.id
            )));
        }
        let url = self
            .streaming
            .url(Pending::Attach(AttachSpec {
                id: record.id,
                monitor_dir: record.monitor_dir,
                tty: request.tty,
                stdin: request.stdin,
                stdout: request.stdout,
                stderr: request.stderr,
            }))
            .map_err(internal)?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let request = request.into_inner();
        let sandbox = self.ready_sandbox(&request.pod_sandbox_id)?;
        // Ports come with each forwarded connection; the request's list is
        // advisory (the kubelet leaves it empty).
        let url = self
            .streaming
            .url(Pending::PortForward(PortForwardSpec {
                netns: sandbox.state.ns_path(sandbox::namespaces::NsKind::Net),
                sandbox_id: sandbox.id,
            }))
            .map_err(internal)?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let id = request.into_inner().container_id;
        let record = self.known_container(&id)?;
        let stats = blocking(move || Ok(stats::container(&record))).await?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        self.reconcile();
        let filter = request.into_inner().filter.unwrap_or_default();
        let records: Vec<ContainerRecord> = self
            .tables()
            .containers
            .all()
            .filter(|c| c.phase == Phase::Running)
            .filter(|c| filter.id.is_empty() || c.id.starts_with(&filter.id))
            .filter(|c| {
                filter.pod_sandbox_id.is_empty() || c.sandbox_id.starts_with(&filter.pod_sandbox_id)
            })
            .filter(|c| matches_labels(&c.config.labels, &filter.label_selector))
            .cloned()
            .collect();
        let stats = blocking(move || Ok(records.iter().map(stats::container).collect())).await?;
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let sandbox = self.known_sandbox(&id)?;
        let containers = self.containers_of(&sandbox.id);
        let stats = blocking(move || Ok(stats::sandbox(&sandbox, &containers))).await?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        self.reconcile();
        let filter = request.into_inner().filter.unwrap_or_default();
        let sandboxes = self.ready_sandboxes(|s| {
            (filter.id.is_empty() || s.id.starts_with(&filter.id))
                && matches_labels(&s.config.labels, &filter.label_selector)
        });
        let stats = blocking(move || {
            Ok(sandboxes
                .iter()
                .map(|(s, c)| stats::sandbox(s, c))
                .collect())
        })
        .await?;
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn checkpoint_container(
        &self,
        _request: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(Status::unimplemented(
            "checkpointing containers is not supported by bosun-cri",
        ))
    }

    type GetContainerEventsStream =
        Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send + 'static>>;

    async fn get_container_events(
        &self,
        _request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        let receiver = self.events.subscribe();
        let stream = tokio_stream::wrappers::BroadcastStream::new(receiver)
            .filter_map(|event| event.ok().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(cri::ListMetricDescriptorsResponse {
            descriptors: metrics::descriptors(),
        }))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        self.reconcile();
        let sandboxes = self.ready_sandboxes(|_| true);
        let pod_metrics = blocking(move || {
            Ok(sandboxes
                .iter()
                .map(|(s, c)| metrics::sandbox(s, c))
                .collect())
        })
        .await?;
        Ok(Response::new(cri::ListPodSandboxMetricsResponse {
            pod_metrics,
        }))
    }
}
