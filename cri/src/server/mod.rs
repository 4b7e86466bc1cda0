//! The `bosun-cri` daemon: RuntimeService and ImageService on a unix socket.
//!
//! Containers run under detached monitors, so stopping the daemon (or
//! killing it) leaves them running; on start it reloads its records and
//! folds in whatever exited meanwhile.

pub mod config;
pub mod counters;
pub mod exec_process;
pub mod images;
pub mod metrics;
pub mod records;
pub mod rootfs;
pub mod runtime;
pub mod state;
pub mod stats;
pub mod streaming;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use self::config::Config;
use crate::image::registry::RegistryConfig;
use crate::image::service::ImageService;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Setting up directories, the socket or the stores failed.
    #[error("{0}")]
    Setup(String),
    /// The gRPC server stopped with an error.
    #[error("serve: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn setup(what: impl std::fmt::Display) -> ServeError {
    ServeError::Setup(what.to_string())
}

/// Binds the socket: root-only, replacing a stale one from a previous run.
/// It is made under a temporary name and renamed into place once listening
/// and chmod'ed, so a client that waits for the path to appear never meets
/// a socket that refuses connections or has the wrong mode.
fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| setup(format!("create {}: {e}", dir.display())))?;
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.binding"));
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(setup(format!(
                "remove stale socket {}: {e}",
                temp.display()
            )))
        }
    }
    let listener = UnixListener::bind(&temp)
        .map_err(|e| setup(format!("listen on {}: {e}", temp.display())))?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| setup(format!("chmod {}: {e}", temp.display())))?;
    std::fs::rename(&temp, path).map_err(|e| {
        setup(format!(
            "move socket {} to {}: {e}",
            temp.display(),
            path.display()
        ))
    })?;
    Ok(listener)
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon stops only when killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Runs the daemon until SIGTERM/SIGINT. Containers keep running after.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    for dir in [&config.root, &config.state] {
        std::fs::create_dir_all(dir)
            .map_err(|e| setup(format!("create {}: {e}", dir.display())))?;
    }
    let mut registry = RegistryConfig::default();
    if let Some(path) = &config.registry_hosts {
        let text = std::fs::read_to_string(path)
            .map_err(|e| setup(format!("read registry hosts {}: {e}", path.display())))?;
        registry = registry
            .with_hosts_json(&text)
            .map_err(|e| setup(format!("registry hosts {}: {e}", path.display())))?;
    }
    let images = ImageService::new(&config.image_root, registry).map_err(setup)?;
    let daemon_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let socket = config.socket.clone();
    let (streaming, stream_listener) =
        streaming::Streaming::bind(&config.stream_address, config.state.join("exec"))
            .await
            .map_err(setup)?;
    let runtime = runtime::Runtime::new(config, images.clone(), daemon_dir, streaming.clone())
        .map_err(setup)?;
    let listener = bind(&socket)?;
    tracing::info!(socket = %socket.display(), stream = %streaming.addr(), "bosun-cri serving CRI v1");
    let stream_server = tokio::spawn(streaming::serve(streaming, stream_listener));
    let exit_watcher = runtime.watch_exits();
    let users: Arc<dyn images::ImageUsers> = runtime.clone();
    let served = tonic::transport::Server::builder()
        .add_service(RuntimeServiceServer::from_arc(runtime))
        .add_service(ImageServiceServer::new(images::Images::new(images, users)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
        .await;
    stream_server.abort();
    exit_watcher.abort();
    served?;
    tracing::info!("bosun-cri stopped; containers keep running under their monitors");
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
