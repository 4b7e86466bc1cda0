//! Image references as users write them, normalised the way docker,
//! containerd and crictl do: `busybox` is `docker.io/library/busybox:latest`.
//!
//! Grammar after distribution's `reference` package: an optional domain
//! (a first component holding `.` or `:`, or `localhost`), lowercase path
//! components, then `:tag` and/or `@algorithm:hex`.

use std::fmt;
use std::str::FromStr;

/// The registry that references without a domain name.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// Docker Hub's path prefix for official images (`busybox` → `library/busybox`).
const OFFICIAL_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
/// Name length limit from distribution's reference grammar.
const NAME_MAX: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("invalid reference {reference:?}: {reason}")]
    Invalid {
        reference: String,
        reason: &'static str,
    },
    #[error("invalid digest {digest:?}: {reason}")]
    Digest {
        digest: String,
        reason: &'static str,
    },
}

/// A content digest, `algorithm:hex`. Only sha256 and sha512 are accepted,
/// the two the OCI image spec registers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: String,
    hex: String,
}

impl Digest {
    /// Wraps a sha256 hash (32 bytes).
    pub fn sha256(hash: &[u8]) -> Digest {
        Digest {
            algorithm: "sha256".to_owned(),
            hex: hex(hash),
        }
    }

    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| ReferenceError::Digest {
            digest: s.to_owned(),
            reason,
        };
        let (algorithm, hex) = s.split_once(':').ok_or(invalid("no algorithm"))?;
        let len = match algorithm {
            "sha256" => 64,
            "sha512" => 128,
            _ => return Err(invalid("algorithm must be sha256 or sha512")),
        };
        if hex.len() != len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid("wrong length or not lowercase hex"));
        }
        Ok(Digest {
            algorithm: algorithm.to_owned(),
            hex: hex.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

/// A normalised reference: domain and repository always present; a tag
/// (`latest` when neither tag nor digest was given) and/or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalises what a user typed.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        let invalid = |reason| ReferenceError::Invalid {
            reference: s.to_owned(),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((name, digest)) => (name, Some(digest.parse::<Digest>()?)),
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/', so a
        // registry port (`host:5000/x`) is not mistaken for one.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(invalid("tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
            }
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first, rest)
            }
            _ => (DEFAULT_DOMAIN, name),
        };
        if !valid_domain(domain) {
            return Err(invalid("bad registry host"));
        }
        let domain = if domain == "index.docker.io" {
            DEFAULT_DOMAIN
        } else {
            domain
        };
        if path.is_empty() || !path.split('/').all(valid_path_component) {
            return Err(invalid(
                "repository must be lowercase components [a-z0-9] joined by '.', '_', '__' or '-'",
            ));
        }
        let repository = if domain == DEFAULT_DOMAIN && !path.contains('/') {
            format!("{OFFICIAL_PREFIX}{path}")
        } else {
            path.to_owned()
        };
        if domain.len() + 1 + repository.len() > NAME_MAX {
            return Err(invalid("name longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            domain: domain.to_owned(),
            repository,
            tag,
            digest,
        })
    }

    /// The registry host (and port), e.g. `docker.io`, `127.0.0.1:5000`.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `domain/repository`, the name repo tags and repo digests start with.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.repository)
    }

    /// `name:tag`, as CRI lists in repo_tags; None for a digest-only reference.
    pub fn tagged(&self) -> Option<String> {
        self.tag
            .as_ref()
            .map(|tag| format!("{}:{tag}", self.name()))
    }

    /// `name@digest` for the given manifest digest, as CRI lists in repo_digests.
    pub fn with_digest(&self, digest: &Digest) -> String {
        format!("{}@{digest}", self.name())
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn object(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => DEFAULT_TAG.to_owned(),
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphanumeric() || c == '_' || (i > 0 && (c == '.' || c == '-'))
        })
}

/// Host labels of letters, digits and '-' joined by '.', an optional port;
/// bracketed IPv6 literals are accepted as they are.
fn valid_domain(domain: &str) -> bool {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, port)) => (ip, port.strip_prefix(':').map(Some).unwrap_or(None)),
            None => return false,
        }
    } else {
        match domain.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        }
    };
    let host_ok = !host.is_empty()
        && (domain.starts_with('[')
            || host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    host_ok && port_ok
}

/// `[a-z0-9]+` runs joined by one `.`, one or two `_`, or any number of `-`.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn norm(s: &str) -> String {
        Reference::parse(s)
            .map(|r| r.to_string())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn normalises_like_docker() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("user/app:v1"), "docker.io/user/app:v1");
        assert_eq!(
            norm("index.docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            norm("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(norm("quay.io/busybox"), "quay.io/busybox:latest");
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(norm("127.0.0.1:5000/a/b/c:t"), "127.0.0.1:5000/a/b/c:t");
        assert_eq!(norm("registry:5000/app"), "registry:5000/app:latest");
    }

    #[test]
    fn digests_and_tags() {
        let r = Reference::parse(&format!("busybox@{D}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().map(ToString::to_string).as_deref(), Some(D));
        assert_eq!(r.object(), D);
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{D}"));
        let r = Reference::parse(&format!("127.0.0.1:5000/x:1@{D}")).unwrap();
        assert_eq!(r.tag(), Some("1"));
        assert_eq!(r.object(), D, "a digest wins over the tag");
        assert_eq!(r.tagged().as_deref(), Some("127.0.0.1:5000/x:1"));
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.object(), "latest");
        let digest: Digest = D.parse().unwrap();
        assert_eq!(
            r.with_digest(&digest),
            format!("docker.io/library/busybox@{D}")
        );
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            &format!("busybox@{}", D.to_uppercase().replace("SHA256", "sha256")),
            "a//b",
            "a/",
            "/a",
            "a..b",
            "a___b",
            "-a",
            "host:port/x",
            "ho_st.com/x",
            &format!("x:{}", "t".repeat(129)),
            &format!("x/{}", "a".repeat(256)),
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn separators_in_components() {
        for good in ["a.b", "a_b", "a__b", "a---b", "a-b.c_d"] {
            assert!(valid_path_component(good), "{good}");
        }
        for bad in ["a.-b", "a_.b", "a.", "_a"] {
            assert!(!valid_path_component(bad), "{bad}");
        }
    }

    #[test]
    fn digest_parsing() {
        let d: Digest = D.parse().unwrap();
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.to_string(), D);
        assert!("sha256:".parse::<Digest>().is_err());
        assert!("0123".parse::<Digest>().is_err());
        assert_eq!(Digest::sha256(&[0xab; 32]).hex(), "ab".repeat(32));
    }
}
