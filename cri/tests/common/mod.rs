//! Shared by the image tests and the pull benchmark: Debian's
//! docker-registry on a free 127.0.0.1 port with its own storage (plain
//! HTTP, or TLS with a test CA and htpasswd basic auth, or a given auth
//! section), images pushed with skopeo; the busybox test image; privilege
//! gating.

#![allow(dead_code)] // each test crate uses its own part of this
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bosun_cri::image::registry::{Endpoint, RegistryConfig};
use bosun_cri::image::service::ImageService;
use bosun_testsupport::layout::{self, ImageInfo};

pub const USER: &str = "bosun";
pub const PASSWORD: &str = "s3cret-pass";

/// A docker-registry process with its own storage; killed on drop.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// The test CA's certificate, for TLS registries.
    pub ca: Option<PathBuf>,
    /// Whether pushes need USER:PASSWORD.
    pub creds: bool,
}

impl Registry {
    pub fn start(tls_auth: bool) -> Result<Registry> {
        Registry::start_with(tls_auth, "")
    }

    /// `extra` is appended to the config (an `auth:` section).
    pub fn start_with(tls_auth: bool, extra: &str) -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage)?;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        let mut ca = None;
        if tls_auth {
            let d = dir.path();
            run(Command::new("openssl").current_dir(d).args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=bosun test CA",
            ]))?;
            run(Command::new("openssl").current_dir(d).args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ]))?;
            fs::write(
                d.join("ext.cnf"),
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
            )?;
            run(Command::new("openssl").current_dir(d).args([
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ]))?;
            let htpasswd = run(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]))?;
            fs::write(d.join("htpasswd"), htpasswd)?;
            // skopeo's --dest-cert-dir wants the CA as *.crt in a directory.
            fs::create_dir_all(d.join("certs"))?;
            fs::copy(d.join("ca.crt"), d.join("certs/ca.crt"))?;
            config.push_str(&format!(
                "  tls:\n    certificate: {0}/server.crt\n    key: {0}/server.key\nauth:\n  htpasswd:\n    realm: bosun-test\n    path: {0}/htpasswd\n",
                d.display()
            ));
            ca = Some(d.join("ca.crt"));
        }
        config.push_str(extra);
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config)?;
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start docker-registry")?;
        let registry = Registry {
            child,
            port,
            dir,
            ca,
            creds: tls_auth || !extra.is_empty(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(
                Instant::now() < deadline,
                "docker-registry did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes an OCI layout's tag to `repo:tag` here.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) -> Result<()> {
        self.push_with(layout, tag, repo, &[])
    }

    /// `push` with extra skopeo flags (`--all`, `--format v2s2`).
    pub fn push_with(&self, layout: &Path, tag: &str, repo: &str, flags: &[&str]) -> Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--insecure-policy"])
            .args(flags);
        match &self.ca {
            Some(_) => {
                cmd.arg("--dest-cert-dir")
                    .arg(self.dir.path().join("certs"));
            }
            None => {
                cmd.arg("--dest-tls-verify=false");
            }
        }
        if self.creds {
            cmd.arg("--dest-creds").arg(format!("{USER}:{PASSWORD}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.host()));
        run(&mut cmd).map(drop)
    }

    /// The data file of a blob in the registry's storage.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: self.host(),
            plain_http: self.ca.is_none(),
            ca_files: self.ca.iter().cloned().collect(),
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

pub fn gate() -> bool {
    bosun_testsupport::privileged::require_root("image pulls from a local docker-registry")
}

/// The busybox test image as an OCI layout (tag `1`).
pub fn busybox_layout(dir: &Path) -> Result<(PathBuf, ImageInfo)> {
    let rootfs = dir.join("rootfs");
    bosun_testsupport::rootfs::busybox(&rootfs)?;
    let layout = dir.join("layout");
    let info = layout::write(&layout, "busybox:1", &rootfs)?;
    Ok((layout, info))
}

pub fn config_for(registry: &Registry) -> RegistryConfig {
    RegistryConfig {
        hosts: HashMap::from([(registry.host(), vec![registry.endpoint()])]),
        retries: 2,
        backoff: Duration::from_millis(50),
        ..RegistryConfig::default()
    }
}

/// Nothing left in the store: no records, blobs, snapshots or temp files.
pub fn assert_store_empty(service: &ImageService) -> Result<()> {
    let root = service.store().root();
    ensure!(service.list_images(None)?.is_empty(), "image records left");
    for sub in ["blobs/sha256", "images", "snapshots"] {
        let left: Vec<_> = fs::read_dir(root.join(sub))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        ensure!(left.is_empty(), "{sub} not empty: {left:?}");
    }
    Ok(())
}

/// The identity token (OAuth2 refresh token) the token server accepts.
pub const REFRESH_TOKEN: &str = "bosun-refresh-token";

/// A token server for the registry's bearer-token auth: checks basic
/// credentials, then issues an RS256 JWT (signed with openssl) granting the
/// requested scope; or, POSTed the OAuth2 refresh-token grant with
/// REFRESH_TOKEN, the same. Returns its port and a count of tokens issued.
pub fn token_server(dir: &Path) -> Result<(u16, Arc<AtomicUsize>)> {
    run(Command::new("openssl").current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "token.key",
        "-out",
        "token.crt",
        "-days",
        "2",
        "-subj",
        "/CN=bosun token issuer",
    ]))?;
    let der = run(Command::new("openssl").current_dir(dir).args([
        "x509",
        "-in",
        "token.crt",
        "-outform",
        "DER",
    ]))?;
    use base64::Engine;
    let x5c = base64::engine::general_purpose::STANDARD.encode(der);
    let key = dir.join("token.key");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let issued = Arc::new(AtomicUsize::new(0));
    let counter = issued.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let _ = (|| -> Result<()> {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    ensure!(client.read(&mut byte)? == 1, "eof");
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let expected = format!(
                    "basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
                );
                // GET: basic credentials, scope in the query. POST (OAuth2
                // refresh-token grant): everything in the form body.
                let params = if head.starts_with("POST ") {
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    let mut body = vec![0u8; length];
                    client.read_exact(&mut body)?;
                    String::from_utf8_lossy(&body).into_owned()
                } else {
                    let path = head.split_whitespace().nth(1).unwrap_or_default();
                    path.split_once('?')
                        .map(|(_, q)| q)
                        .unwrap_or_default()
                        .to_owned()
                };
                let authorised = if head.starts_with("POST ") {
                    params.split('&').any(|p| p == "grant_type=refresh_token")
                        && params
                            .split('&')
                            .any(|p| p == format!("refresh_token={REFRESH_TOKEN}"))
                } else {
                    head.lines().any(|l| {
                        l.to_ascii_lowercase().starts_with("authorization:")
                            && l[14..].trim().eq_ignore_ascii_case(&expected)
                    })
                };
                if !authorised {
                    client.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
                    return Ok(());
                }
                // scope=repository:NAME:ACTIONS (URL-encoded ':' and ',').
                let mut access = Vec::new();
                for pair in params.split('&') {
                    if let Some(scope) = pair.strip_prefix("scope=") {
                        let scope = scope
                            .replace("%3A", ":")
                            .replace("%3a", ":")
                            .replace("%2C", ",")
                            .replace("%2c", ",")
                            .replace("%2F", "/")
                            .replace("%2f", "/");
                        let mut parts = scope.splitn(3, ':');
                        let (kind, name, actions) = (
                            parts.next().unwrap_or_default(),
                            parts.next().unwrap_or_default(),
                            parts.next().unwrap_or_default(),
                        );
                        access.push(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
                    }
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs();
                let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
                let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
                let claims = serde_json::json!({
                    "iss": "bosun-test-issuer", "sub": USER, "aud": "bosun-test-registry",
                    "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", counter.load(Ordering::SeqCst)),
                    "access": access});
                let signing_input = format!(
                    "{}.{}",
                    b64(&serde_json::to_vec(&header)?),
                    b64(&serde_json::to_vec(&claims)?)
                );
                let mut openssl = Command::new("openssl")
                    .args(["dgst", "-sha256", "-sign"])
                    .arg(&key)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()?;
                openssl
                    .stdin
                    .take()
                    .context("stdin")?
                    .write_all(signing_input.as_bytes())?;
                let signature = openssl.wait_with_output()?.stdout;
                let token = format!("{signing_input}.{}", b64(&signature));
                let body = serde_json::to_vec(
                    &serde_json::json!({"token": token, "access_token": token, "expires_in": 300}),
                )?;
                client.write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes())?;
                client.write_all(&body)?;
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })();
        }
    });
    Ok((port, issued))
}

/// Starts a token server and a registry in token mode that sends clients
/// to it; returns both and the count of tokens issued.
pub fn token_registry(dir: &Path) -> Result<(Registry, Arc<AtomicUsize>)> {
    let (token_port, issued) = token_server(dir)?;
    let auth = format!(
        "auth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n    service: bosun-test-registry\n    issuer: bosun-test-issuer\n    rootcertbundle: {}\n",
        dir.join("token.crt").display()
    );
    Ok((Registry::start_with(false, &auth)?, issued))
}
