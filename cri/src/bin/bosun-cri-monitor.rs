//! `bosun-cri-monitor`: the per-container monitor started by `bosun-cri`.
//! See `bosun_cri::monitor` for its command line and protocols.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = bosun_cri::monitor::supervise::Args::parse();
    bosun_cri::monitor::supervise::main(&args)
}
