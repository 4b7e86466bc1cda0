//! `bosun-runc`: runc's command line over libcontainer.

use bosun_runtime::cli::{Cli, Command};
use bosun_runtime::commands::{self, Ctx};
use bosun_runtime::logging::{self, Format};

fn main() {
    let cli = Cli::parse_args();
    // CVE-2019-5736: see exe_guard. Only commands that fork container
    // processes need it; the others never share namespaces with one.
    if matches!(
        cli.command,
        Command::Create(_) | Command::Run(_) | Command::Exec(_)
    ) {
        if let Err(e) = bosun_runtime::exe_guard::ensure_read_only_exe() {
            eprintln!("bosun-runc: {e}");
            std::process::exit(1);
        }
    }
    let g = &cli.global;
    let format = if g.log_format == "json" {
        Format::Json
    } else {
        Format::Text
    };
    let logs_to_stderr = logging::init(g.log.as_deref(), format, g.debug);
    let ctx = Ctx {
        root: g.root.clone(),
        systemd_cgroup: g.systemd_cgroup,
    };
    if g.systemd_cgroup && !std::path::Path::new("/run/systemd/system").is_dir() {
        fail("systemd cgroup driver requested (--systemd-cgroup) but systemd is not running on this host", 1, logs_to_stderr);
    }
    // runc exits 255 when exec itself fails, 1 for every other error.
    let (result, err_code) = match &cli.command {
        Command::Create(a) => (commands::create(&ctx, a), 1),
        Command::Start(a) => (commands::start(&ctx, &a.id), 1),
        Command::Run(a) => (commands::run(&ctx, a), 1),
        Command::State(a) => (commands::state(&ctx, &a.id), 1),
        Command::Kill(a) => (commands::kill(&ctx, a), 1),
        Command::Delete(a) => (commands::delete(&ctx, a), 1),
        Command::Exec(a) => (commands::exec(&ctx, a), 255),
        Command::Ps(a) => (commands::ps(&ctx, a), 1),
        Command::List(a) => (commands::list(&ctx, a), 1),
        Command::Pause(a) => (commands::pause(&ctx, &a.id), 1),
        Command::Resume(a) => (commands::resume(&ctx, &a.id), 1),
        Command::Events(a) => (commands::events(&ctx, a), 1),
        Command::Update(a) => (commands::update(&ctx, a), 1),
        Command::Features => (commands::features(), 1),
        Command::Spec(a) => (commands::spec(a), 1),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let prefix = match &cli.command {
                Command::Create(_) => "runc create failed: ",
                Command::Run(_) => "runc run failed: ",
                Command::Exec(_) => "exec failed: ",
                _ => "",
            };
            fail(&format!("{prefix}{e}"), err_code, logs_to_stderr)
        }
    }
}

/// Reports the error once on stderr (logrus text, as runc) and in the log
/// file if one was given, then exits.
fn fail(msg: &str, code: i32, logs_to_stderr: bool) -> ! {
    tracing::error!("{msg}");
    if !logs_to_stderr {
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        eprint!(
            "{}",
            logging::format_line(Format::Text, tracing::Level::ERROR, msg, &time)
        );
    }
    std::process::exit(code)
}
