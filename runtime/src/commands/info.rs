//! list, ps, events, update, features, spec.

use std::io::Read;
use std::process::Command;

use libcgroups::common::{CgroupManager, ControllerOpt};
use libcontainer::container::state::State;
use libcontainer::container::{Container, ContainerStatus};

use super::{observe, user_name, Ctx};
use crate::cli::{parse_duration, EventsArgs, ListArgs, PsArgs, SpecArgs, UpdateArgs};
use crate::state::{list_table, ContainerState};
use crate::stats::{Data, Event};
use crate::Error;

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, Error> {
    serde_json::to_string(v).map_err(|e| Error::Invalid(format!("encoding json: {e}")))
}

pub fn list(ctx: &Ctx, a: &ListArgs) -> Result<i32, Error> {
    let mut states = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&ctx.root) {
        for e in entries.flatten() {
            let dir = e.path();
            if !State::file_path(&dir).exists() {
                continue;
            }
            // A container deleted while we list is simply not listed.
            let Ok(c) = Container::load(dir) else {
                continue;
            };
            let mut s = ContainerState::from_observed(&observe(&c));
            s.owner = c.state.creator.map(user_name).unwrap_or_default();
            states.push(s);
        }
    }
    states.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    if a.quiet {
        for s in &states {
            println!("{}", s.id);
        }
    } else if a.format == "json" {
        println!("{}", to_json(&states)?);
    } else {
        print!("{}", list_table(&states));
    }
    Ok(0)
}

pub fn ps(ctx: &Ctx, a: &PsArgs) -> Result<i32, Error> {
    let c = ctx.load(&a.id)?;
    let pids: Vec<i32> = if c.status() == ContainerStatus::Stopped {
        Vec::new()
    } else {
        ctx.cgroup_manager(&c)?
            .get_all_pids()
            .map_err(|e| Error::cgroup("listing pids of", &a.id, e))?
            .iter()
            .map(|p| p.as_raw())
            .collect()
    };
    if a.format == "json" {
        println!("{}", to_json(&pids)?);
        return Ok(0);
    }
    let opts = if a.ps_options.is_empty() {
        vec!["-ef".to_string()]
    } else {
        a.ps_options.clone()
    };
    let out = Command::new("ps")
        .args(&opts)
        .output()
        .map_err(|e| Error::io("running", "ps", e))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "ps {}: {}",
            opts.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    print!(
        "{}",
        filter_ps(&String::from_utf8_lossy(&out.stdout), &pids)?
    );
    Ok(0)
}

/// Keeps the header and the `ps` lines whose PID column is in `pids`.
pub fn filter_ps(out: &str, pids: &[i32]) -> Result<String, Error> {
    let mut lines = out.lines();
    let header = lines.next().unwrap_or_default();
    let col = header
        .split_whitespace()
        .position(|h| h == "PID")
        .ok_or_else(|| Error::Invalid("couldn't find PID field in ps output".into()))?;
    let mut s = format!("{header}\n");
    for l in lines {
        if let Some(pid) = l
            .split_whitespace()
            .nth(col)
            .and_then(|p| p.parse::<i32>().ok())
        {
            if pids.contains(&pid) {
                s.push_str(l);
                s.push('\n');
            }
        }
    }
    Ok(s)
}

pub fn events(ctx: &Ctx, a: &EventsArgs) -> Result<i32, Error> {
    let interval = parse_duration(&a.interval)
        .ok_or_else(|| Error::Invalid(format!("invalid --interval {:?}", a.interval)))?;
    let c = ctx.load(&a.id)?;
    if c.status() == ContainerStatus::Stopped {
        return Err(Error::NotRunning { id: a.id.clone() });
    }
    let cg = ctx.cgroup_manager(&c)?;
    loop {
        let stats = cg
            .stats()
            .map_err(|e| Error::cgroup("reading stats of", &a.id, e))?;
        let ev = Event {
            kind: "stats",
            id: &a.id,
            data: Data::from_stats(&stats),
        };
        println!("{}", to_json(&ev)?);
        if a.stats {
            return Ok(0);
        }
        std::thread::sleep(interval);
        // Stop once the container is gone, as runc's event loop does.
        match ctx.load(&a.id) {
            Ok(c) if c.status() != ContainerStatus::Stopped => {}
            _ => return Ok(0),
        }
    }
}

pub fn update(ctx: &Ctx, a: &UpdateArgs) -> Result<i32, Error> {
    let resources = match &a.resources {
        Some(path) => {
            let mut text = String::new();
            if path == "-" {
                std::io::stdin()
                    .read_to_string(&mut text)
                    .map_err(|e| Error::io("reading", "stdin", e))?;
            } else {
                text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
            }
            crate::resources::parse_resources(path, &text)?
        }
        None => a.flags.to_resources()?,
    };
    let c = ctx.load(&a.id)?;
    if c.status() == ContainerStatus::Stopped {
        return Err(Error::NotRunning { id: a.id.clone() });
    }
    ctx.cgroup_manager(&c)?
        .apply(&ControllerOpt {
            resources: &resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(|e| Error::cgroup("updating", &a.id, e))?;
    Ok(0)
}

pub fn features() -> Result<i32, Error> {
    let f = crate::features::features(crate::features::kernel_cap_count());
    let s = serde_json::to_string_pretty(&f)
        .map_err(|e| Error::Invalid(format!("encoding features: {e}")))?;
    println!("{s}");
    Ok(0)
}

pub fn spec(a: &SpecArgs) -> Result<i32, Error> {
    let path = a.bundle.join("config.json");
    if path.exists() {
        return Err(Error::Invalid(format!(
            "File {} exists. Remove it first",
            path.display()
        )));
    }
    let mut s = crate::spec::default_spec();
    if a.rootless {
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        crate::spec::make_rootless(&mut s, uid, gid);
    }
    let text = serde_json::to_string_pretty(&s)
        .map_err(|e| Error::Invalid(format!("encoding spec: {e}")))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io("writing", &path, e))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_filter_keeps_container_pids() {
        let out = "UID        PID  PPID  C STIME TTY          TIME CMD\n\
                   root         1     0  0 13:53 ?        00:00:00 init\n\
                   root      4578     1  0 13:53 ?        00:00:00 sleep 100\n";
        let f = filter_ps(out, &[4578]).unwrap_or_default();
        assert_eq!(f.lines().count(), 2);
        assert!(f.contains("sleep 100"));
        assert!(filter_ps("NOPID\n", &[]).is_err());
    }
}
