//! The success result of ADD (and what CHECK compares against), in the JSON
//! shape of each spec version.
//!
//! 1.x drops the per-IP `version` field that 0.3.x/0.4.0 require; the rest
//! is identical, so one type serialises both ways.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::CniError;

/// One interface the plugin created or touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Device name.
    pub name: String,
    /// MAC address, `aa:bb:...`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// The netns path for container-side interfaces; absent on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// One address given to an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length.
    pub address: IpNet,
    /// Gateway for this address's subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces` of the interface holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route installed in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    /// Destination.
    pub dst: IpNet,
    /// Next hop; on-link when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// An ADD result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// Interfaces, host side first (bridge, host veth), container last.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Addresses.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

impl CniResult {
    /// The JSON a runtime speaking `cni_version` expects on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let legacy = cni_version.starts_with("0.");
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut value = serde_json::to_value(ip).unwrap_or(Value::Null);
                if legacy {
                    let family = if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    value["version"] = Value::from(family);
                }
                value
            })
            .collect();
        serde_json::json!({
            "cniVersion": cni_version,
            "interfaces": self.interfaces,
            "ips": ips,
            "routes": self.routes,
            "dns": {},
        })
    }

    /// Reads a result of any supported version (the `prevResult` a runtime
    /// hands to CHECK, or our own cache); unknown fields are ignored.
    pub fn from_json(value: &Value) -> Result<Self, CniError> {
        serde_json::from_value(value.clone())
            .map_err(|e| CniError::decoding(format!("prevResult is not a CNI result: {e}")))
    }

    /// The container-side interface (the one with a sandbox), if any.
    pub fn container_interface(&self) -> Option<(usize, &Interface)> {
        self.interfaces
            .iter()
            .enumerate()
            .find(|(_, i)| i.sandbox.is_some())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: "02:00:00:00:00:01".into(),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    sandbox: Some("/run/netns/p".into()),
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.1.0.2/24".parse().unwrap(),
                    gateway: Some("10.1.0.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00::2/64".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
            ],
            routes: vec![RouteConfig {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.1.0.1".parse().unwrap()),
            }],
        }
    }

    #[test]
    fn v1_result_has_no_ip_version_field() {
        let json = sample().to_json("1.1.0");
        assert_eq!(json["cniVersion"], "1.1.0");
        assert_eq!(
            json["ips"][0],
            json!({"address":"10.1.0.2/24","gateway":"10.1.0.1","interface":1})
        );
        assert_eq!(
            json["interfaces"][0],
            json!({"name":"cni0","mac":"02:00:00:00:00:01"})
        );
        assert_eq!(
            json["routes"][0],
            json!({"dst":"0.0.0.0/0","gw":"10.1.0.1"})
        );
    }

    #[test]
    fn legacy_result_tags_each_ip_with_its_family() {
        let json = sample().to_json("0.3.1");
        assert_eq!(json["ips"][0]["version"], "4");
        assert_eq!(json["ips"][1]["version"], "6");
    }

    #[test]
    fn round_trips_through_either_shape() {
        for version in ["0.4.0", "1.0.0"] {
            let back = CniResult::from_json(&sample().to_json(version)).unwrap();
            assert_eq!(back, sample());
        }
        assert_eq!(sample().container_interface().unwrap().0, 1);
        assert!(CniResult::from_json(&json!({"ips": "x"})).is_err());
    }
}
