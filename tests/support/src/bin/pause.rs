//! `bosun-pause`: the pause ("infra") process of the critest stand-in
//! sandbox image. Sleeps, reaps the orphans a shared PID namespace hands
//! it, and exits 0 on SIGINT or SIGTERM, as Kubernetes' pause does. A real
//! program rather than busybox `sleep`: specs look for `sleep` processes
//! in pods whose PID namespace the pause process shares.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

fn main() {
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        signals.add(signal);
    }
    if let Err(e) = signals.thread_block() {
        eprintln!("bosun-pause: blocking signals: {e}");
        std::process::exit(1);
    }
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if status == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => std::process::exit(0),
            Err(e) => {
                eprintln!("bosun-pause: waiting for signals: {e}");
                std::process::exit(1);
            }
        }
    }
}
