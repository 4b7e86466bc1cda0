//! The `bandwidth` capability, shaped as the reference `bandwidth` plugin
//! does: a token bucket on the host veth limits traffic *to* the pod; the
//! host veth's ingress (traffic *from* the pod) is redirected to an ifb
//! device whose token bucket limits it.
//!
//! Shaping is rare and not on anyone's hot path, so it drives `tc` and `ip`
//! rather than encoding tc netlink by hand.

use std::process::Command;

use crate::netconf::Bandwidth;

/// A failure to set up shaping.
#[derive(Debug, thiserror::Error)]
pub enum ShapingError {
    /// A rate without a burst (or the reverse) cannot form a token bucket.
    #[error("runtimeConfig.bandwidth: {0}")]
    Invalid(String),
    /// `tc` or `ip` failed.
    #[error("{command}: {output}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
}

/// The ifb device carrying a pod's egress shaping, named after its veth.
pub fn ifb_name(host_veth: &str) -> String {
    let suffix = host_veth.strip_prefix("veth").unwrap_or(host_veth);
    format!("bsnb{suffix}")
}

/// (rate, burst) in bits, when both are given; an error if only one is.
fn bucket(
    rate: Option<u64>,
    burst: Option<u64>,
    what: &str,
) -> Result<Option<(u64, u64)>, ShapingError> {
    match (rate.filter(|r| *r > 0), burst.filter(|b| *b > 0)) {
        (Some(rate), Some(burst)) => Ok(Some((rate, burst))),
        (None, None) => Ok(None),
        _ => Err(ShapingError::Invalid(format!(
            "{what}Rate and {what}Burst must be given together"
        ))),
    }
}

/// The `tc` arguments of a token bucket (burst is in bytes for tc).
fn tbf_args(device: &str, rate: u64, burst: u64) -> Vec<String> {
    [
        "qdisc",
        "add",
        "dev",
        device,
        "root",
        "tbf",
        "rate",
        &format!("{rate}bit"),
        "burst",
        &format!("{}", burst.div_ceil(8).max(1)),
        "latency",
        "25ms",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// The commands that shape `host_veth` (and its ifb) to `limits`.
pub fn plan(
    host_veth: &str,
    alias: &str,
    limits: &Bandwidth,
) -> Result<Vec<Vec<String>>, ShapingError> {
    let to_pod = bucket(limits.ingress_rate, limits.ingress_burst, "ingress")?;
    let from_pod = bucket(limits.egress_rate, limits.egress_burst, "egress")?;
    let mut commands = Vec::new();
    if let Some((rate, burst)) = to_pod {
        let mut tc = vec!["tc".to_owned()];
        tc.extend(tbf_args(host_veth, rate, burst));
        commands.push(tc);
    }
    if let Some((rate, burst)) = from_pod {
        let ifb = ifb_name(host_veth);
        let line = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        commands.push(line(&format!("ip link add name {ifb} type ifb")));
        let mut alias_cmd = line(&format!("ip link set dev {ifb} up alias"));
        alias_cmd.push(alias.to_owned());
        commands.push(alias_cmd);
        commands.push(line(&format!(
            "tc qdisc add dev {host_veth} handle ffff: ingress"
        )));
        commands.push(line(&format!(
            "tc filter add dev {host_veth} parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev {ifb}"
        )));
        let mut tc = vec!["tc".to_owned()];
        tc.extend(tbf_args(&ifb, rate, burst));
        commands.push(tc);
    }
    Ok(commands)
}

/// Applies [`plan`]. The ifb carries the attachment's alias, so GC finds it.
pub fn apply(host_veth: &str, alias: &str, limits: &Bandwidth) -> Result<(), ShapingError> {
    for argv in plan(host_veth, alias, limits)? {
        let output = Command::new(&argv[0]).args(&argv[1..]).output();
        let command = argv.join(" ");
        match output {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return Err(ShapingError::Command {
                    command,
                    output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                })
            }
            Err(err) => {
                return Err(ShapingError::Command {
                    command,
                    output: err.to_string(),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn ingress_only_is_one_tbf_on_the_veth() {
        let limits = Bandwidth {
            ingress_rate: Some(1_000_000),
            ingress_burst: Some(80_000),
            ..Bandwidth::default()
        };
        let plan = plan("veth0a0b0c0d", "a", &limits).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(
            plan[0].join(" "),
            "tc qdisc add dev veth0a0b0c0d root tbf rate 1000000bit burst 10000 latency 25ms"
        );
    }

    #[test]
    fn egress_goes_through_an_ifb_with_the_alias() {
        let limits = Bandwidth {
            egress_rate: Some(2_000_000),
            egress_burst: Some(16),
            ..Bandwidth::default()
        };
        let plan = plan("veth0a0b0c0d", "bosun-cni/n/c/eth0", &limits).unwrap();
        let text: Vec<String> = plan.iter().map(|c| c.join(" ")).collect();
        assert_eq!(text[0], "ip link add name bsnb0a0b0c0d type ifb");
        assert_eq!(
            text[1],
            "ip link set dev bsnb0a0b0c0d up alias bosun-cni/n/c/eth0"
        );
        assert!(text[3].ends_with("redirect dev bsnb0a0b0c0d"));
        assert!(text[4].contains("dev bsnb0a0b0c0d root tbf rate 2000000bit burst 2 "));
    }

    #[test]
    fn rate_without_burst_is_rejected() {
        let limits = Bandwidth {
            ingress_rate: Some(1),
            ..Bandwidth::default()
        };
        assert!(plan("v", "a", &limits)
            .unwrap_err()
            .to_string()
            .contains("ingressBurst"));
    }
}
