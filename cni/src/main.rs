//! `bosun-cni`: the plugin binary. Reads the `CNI_*` environment and the
//! netconf on stdin, prints the result or the spec's error JSON on stdout.

use std::io::{Read, Write};
use std::process::ExitCode;

use bosun_cni::env;
use bosun_cni::link::Links;
use bosun_cni::plugin;
use bosun_cni::rtnl::Rtnl;
use bosun_cni::CniError;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return fail(&CniError::io(format!("read stdin: {e}")), "");
    }
    // Errors are tagged with the request's version when it is readable.
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| plugin::SPEC_VERSION.to_owned());
    let env = match env::parse(|k| std::env::var(k).ok()) {
        Ok(env) => env,
        Err(err) => return fail(&err, &version),
    };
    let mut reap = Vec::new();
    let code = match plugin::run(&env, &stdin, &mut reap) {
        Ok(Some(out)) => {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{out}");
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => fail(&err, &version),
    };
    if !reap.is_empty() {
        reap_in_background(reap);
    }
    code
}

fn fail(err: &CniError, version: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", err.to_json(version));
    let _ = stdout.flush();
    ExitCode::FAILURE
}

/// Deleting a veth waits for RCU grace periods in the kernel (~20 ms);
/// DEL has already taken the link out of service (no addresses, down,
/// renamed), so a detached child finishes the job while the runtime moves
/// on. The child drops our stdio first: runtimes wait for EOF on it.
fn reap_in_background(links: Vec<(Rtnl, u32)>) {
    // SAFETY: the plugin is single-threaded, so the child may run any code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                use std::os::fd::AsRawFd;
                for fd in 0..3 {
                    let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
                }
            }
            let _ = nix::unistd::setsid();
            for (mut rtnl, index) in links {
                let _ = rtnl.delete_link(index);
            }
            std::process::exit(0);
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {}
        // No child: delete in the foreground, slower but complete.
        Err(_) => {
            for (mut rtnl, index) in links {
                let _ = rtnl.delete_link(index);
            }
        }
    }
}
