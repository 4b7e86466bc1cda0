//! `bosun-cri`: the CRI server daemon (RuntimeService + ImageService on a
//! unix socket), for the upstream kubelet, crictl or our own node agent.

use std::path::PathBuf;
use std::process::ExitCode;

use bosun_cri::server::{self, config::Config};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Flags override the config file, which overrides the defaults.
#[derive(Debug, Parser)]
#[command(name = "bosun-cri", version, about = "Bosun's CRI server")]
struct Cli {
    /// TOML config file (every key optional).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Persistent data directory.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Runtime state directory (tmpfs).
    #[arg(long)]
    state: Option<PathBuf>,
    /// The CRI socket to serve.
    #[arg(long, visible_alias = "listen")]
    socket: Option<PathBuf>,
    /// Image store directory.
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// CNI network configuration directory.
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// CNI plugin directory (repeatable; replaces the configured list).
    #[arg(long = "cni-bin-dir")]
    cni_bin_dirs: Vec<PathBuf>,
    /// Runtime handler used when a pod names none.
    #[arg(long)]
    default_runtime: Option<String>,
    /// Registry mirrors/endpoints (JSON).
    #[arg(long)]
    registry_hosts: Option<PathBuf>,
    /// Streaming server address (exec/attach/port-forward).
    #[arg(long)]
    stream_address: Option<String>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log level filter (e.g. `info`, `debug`, `bosun_cri=debug`).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn config(cli: &Cli) -> Result<Config, String> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => {$(
            if let Some(value) = &cli.$field { config.$field = value.clone(); }
        )*};
    }
    set!(
        root,
        state,
        socket,
        image_root,
        cni_conf_dir,
        default_runtime,
        stream_address
    );
    if cli.registry_hosts.is_some() {
        config.registry_hosts.clone_from(&cli.registry_hosts);
    }
    if !cli.cni_bin_dirs.is_empty() {
        config.cni_bin_dirs.clone_from(&cli.cni_bin_dirs);
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log_level);
    let config = match config(&cli) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("bosun-cri: {message}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bosun-cri: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bosun-cri: {e}");
            ExitCode::FAILURE
        }
    }
}
