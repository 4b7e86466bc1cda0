//! The CNI error result: what a plugin prints on stdout (with a non-zero exit)
//! when a verb fails, so the runtime can tell the user *why*.
//!
//! Codes 1–99 are reserved by the spec; plugins use 100 and above for their own.

use serde::Serialize;

/// Well-known error codes from the CNI spec, plus ours (>= 100).
pub mod code {
    /// The requested `cniVersion` is not one this plugin speaks.
    pub const INCOMPATIBLE_CNI_VERSION: u32 = 1;
    /// A field in the network config is recognised but not supported.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// The container is unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// A required `CNI_*` environment variable is missing or invalid.
    pub const INVALID_ENVIRONMENT_VARIABLES: u32 = 4;
    /// An I/O operation failed (e.g. reading the IPAM store).
    pub const IO_FAILURE: u32 = 5;
    /// The network config or another input could not be decoded.
    pub const DECODING_FAILURE: u32 = 6;
    /// The network config decoded but is not valid.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// A transient failure: the runtime should retry later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADDs at the moment.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: the plugin is not available; existing containers may have
    /// limited connectivity.
    pub const PLUGIN_NOT_AVAILABLE_LIMITED_CONNECTIVITY: u32 = 51;
    /// Ours: every address in a range set is taken.
    pub const IPAM_EXHAUSTED: u32 = 100;
    /// Ours: a requested IP (runtimeConfig.ips) cannot be given.
    pub const IPAM_REQUESTED_IP_UNAVAILABLE: u32 = 101;
    /// Ours: CHECK found the attachment differs from its ADD result.
    pub const CHECK_FAILED: u32 = 102;
    /// Ours: a requested host port is already forwarded to another container.
    pub const HOST_PORT_TAKEN: u32 = 103;
}

/// A CNI error as the spec defines it: a numeric code, a short message and
/// optional longer details.
///
/// It is a plain value (not an enum) because the wire format is open-ended:
/// any plugin code >= 100 is legal, and a delegated plugin's error must pass
/// through unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.display())]
pub struct CniError {
    /// Spec error code (1–99 reserved, >= 100 plugin specific).
    pub code: u32,
    /// Short, lowercase description of what failed.
    pub msg: String,
    /// The value, field or path that failed; may be empty.
    pub details: String,
}

/// Wire form of [`CniError`]; kept private so the JSON field names live in
/// one place.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorJson<'a> {
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    details: &'a str,
}

impl CniError {
    /// Builds an error with any code; prefer the named constructors.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Code 1: `version` is not in the plugin's supported list.
    pub fn incompatible_version(version: &str) -> Self {
        Self::new(
            code::INCOMPATIBLE_CNI_VERSION,
            "incompatible cni version",
            format!("cniVersion {version:?} is not supported"),
        )
    }

    /// Code 2: a field we recognise but do not implement.
    pub fn unsupported_field(details: impl Into<String>) -> Self {
        Self::new(code::UNSUPPORTED_FIELD, "unsupported field", details)
    }

    /// Code 3: the container is unknown or gone.
    pub fn unknown_container(details: impl Into<String>) -> Self {
        Self::new(
            code::UNKNOWN_CONTAINER,
            "container unknown or does not exist",
            details,
        )
    }

    /// Code 4: a `CNI_*` variable is missing or malformed.
    pub fn invalid_environment(details: impl Into<String>) -> Self {
        Self::new(
            code::INVALID_ENVIRONMENT_VARIABLES,
            "invalid necessary environment variables",
            details,
        )
    }

    /// Code 5: an I/O operation failed.
    pub fn io(details: impl Into<String>) -> Self {
        Self::new(code::IO_FAILURE, "i/o failure", details)
    }

    /// Code 6: input could not be decoded.
    pub fn decoding(details: impl Into<String>) -> Self {
        Self::new(code::DECODING_FAILURE, "failed to decode content", details)
    }

    /// Code 7: the network config is semantically invalid.
    pub fn invalid_config(details: impl Into<String>) -> Self {
        Self::new(
            code::INVALID_NETWORK_CONFIG,
            "invalid network config",
            details,
        )
    }

    /// Code 11: a transient condition; the runtime should retry.
    pub fn try_again_later(details: impl Into<String>) -> Self {
        Self::new(code::TRY_AGAIN_LATER, "try again later", details)
    }

    /// Code 50: STATUS says ADDs cannot be served now.
    pub fn plugin_not_available(details: impl Into<String>) -> Self {
        Self::new(code::PLUGIN_NOT_AVAILABLE, "plugin not available", details)
    }

    /// Code 51: STATUS says the plugin is unavailable and existing
    /// containers may have limited connectivity.
    pub fn plugin_not_available_limited(details: impl Into<String>) -> Self {
        Self::new(
            code::PLUGIN_NOT_AVAILABLE_LIMITED_CONNECTIVITY,
            "plugin not available, existing containers may have limited connectivity",
            details,
        )
    }

    /// Code 100: no free address left in a range set.
    pub fn ipam_exhausted(range_set: &str) -> Self {
        Self::new(
            code::IPAM_EXHAUSTED,
            "no ip addresses available",
            format!("no IP addresses available in range set {range_set}"),
        )
    }

    /// Code 101: a requested address is outside every range, the gateway,
    /// or held by another container.
    pub fn requested_ip_unavailable(details: impl Into<String>) -> Self {
        Self::new(
            code::IPAM_REQUESTED_IP_UNAVAILABLE,
            "requested ip address unavailable",
            details,
        )
    }

    /// The spec's error JSON, tagged with the `cniVersion` of the request
    /// (the runtime decodes the error with that version's rules).
    pub fn to_json(&self, cni_version: &str) -> String {
        let wire = ErrorJson {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        };
        // Serialising a struct of strings and a u32 cannot fail; fall back to
        // a hand-built minimal error rather than panicking in a plugin.
        serde_json::to_string(&wire).unwrap_or_else(|_| {
            format!(
                "{{\"cniVersion\":{cni_version:?},\"code\":{},\"msg\":\"error\"}}",
                self.code
            )
        })
    }

    fn display(&self) -> String {
        if self.details.is_empty() {
            self.msg.clone()
        } else {
            format!("{}: {}", self.msg, self.details)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn json_has_the_spec_fields() {
        let err = CniError::invalid_config("ipam.subnet \"x\" is not a CIDR");
        let got: Value = serde_json::from_str(&err.to_json("1.1.0")).unwrap();
        assert_eq!(
            got,
            json!({
                "cniVersion": "1.1.0",
                "code": 7,
                "msg": "invalid network config",
                "details": "ipam.subnet \"x\" is not a CIDR",
            })
        );
    }

    #[test]
    fn empty_details_are_omitted() {
        let err = CniError::new(code::TRY_AGAIN_LATER, "busy", "");
        let got: Value = serde_json::from_str(&err.to_json("1.0.0")).unwrap();
        assert_eq!(
            got,
            json!({"cniVersion": "1.0.0", "code": 11, "msg": "busy"})
        );
    }

    #[test]
    fn constructors_use_the_spec_codes() {
        let cases = [
            (CniError::incompatible_version("9.9.9"), 1),
            (CniError::unsupported_field("x"), 2),
            (CniError::unknown_container("x"), 3),
            (CniError::invalid_environment("x"), 4),
            (CniError::io("x"), 5),
            (CniError::decoding("x"), 6),
            (CniError::invalid_config("x"), 7),
            (CniError::try_again_later("x"), 11),
            (CniError::plugin_not_available("x"), 50),
            (CniError::plugin_not_available_limited("x"), 51),
            (CniError::ipam_exhausted("10.0.0.0/24"), 100),
            (CniError::requested_ip_unavailable("x"), 101),
        ];
        for (err, want) in cases {
            assert_eq!(err.code, want, "{err}");
            assert_eq!(err.msg, err.msg.to_lowercase(), "msg must be lowercase");
        }
    }

    #[test]
    fn display_joins_msg_and_details() {
        let err = CniError::incompatible_version("0.2.0");
        assert_eq!(
            err.to_string(),
            "incompatible cni version: cniVersion \"0.2.0\" is not supported"
        );
        assert_eq!(
            CniError::new(5, "i/o failure", "").to_string(),
            "i/o failure"
        );
    }
}
