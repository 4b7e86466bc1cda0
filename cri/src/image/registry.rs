//! Pulling images from OCI distribution (Docker Registry HTTP API v2)
//! registries into the content store and snapshots.
//!
//! HTTP, TLS, the WWW-Authenticate bearer-token flow and basic auth come from
//! `oci-client`. On top of it this module adds what it lacks or what we do
//! not trust it with: per-registry endpoint lists (mirrors, in the spirit of
//! containerd's hosts.toml) each with its own scheme and CA files; our own
//! manifest parsing and platform selection (OCI index and Docker manifest
//! list, OCI and Docker schema2 manifests, config platform check); digest
//! and size verification of every manifest and blob while it streams into
//! the store; retries with backoff on 5xx, 429, timeouts and broken
//! connections; bounded parallel layer fetches; progress logs; and CRI's
//! AuthConfig forms of credentials.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::reference::{Digest, Reference};
use super::store::{sha256_digest, ContentStore, LayerRecord, StoreError};
use super::unpack::{self, UnpackError};

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const ACCEPTED_MANIFESTS: &[&str] = &[
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
];
pub(crate) const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];
/// Manifests and configs are small; a bigger one is hostile.
pub(crate) const MAX_MANIFEST_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{reference}: not found in the registry ({detail})")]
    NotFound { reference: String, detail: String },
    #[error("{reference}: authentication failed ({detail})")]
    Unauthorized { reference: String, detail: String },
    #[error("{reference}: {what}: {source}")]
    Client {
        reference: String,
        what: String,
        source: OciDistributionError,
    },
    #[error("{reference}: blob {digest}: {detail}")]
    Stream {
        reference: String,
        digest: String,
        detail: String,
    },
    #[error("{reference}: {source}")]
    Store {
        reference: String,
        source: StoreError,
    },
    #[error("{reference}: {what} has digest {actual}, expected {expected}")]
    ManifestDigest {
        reference: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{reference}: invalid manifest or config: {detail}")]
    Invalid { reference: String, detail: String },
    #[error("{reference}: no manifest for platform {wanted}; the image has {available}")]
    Platform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("{reference}: layer {digest}: {source}")]
    Unpack {
        reference: String,
        digest: String,
        source: UnpackError,
    },
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("registry config: {0}")]
    Config(String),
    #[error("{reference}: {detail}")]
    Task { reference: String, detail: String },
}

impl RegistryError {
    /// Errors a retry (or the next endpoint) can fix: server-side 5xx/429,
    /// timeouts, dropped connections. Never content that failed verification.
    fn retryable(&self) -> bool {
        match self {
            RegistryError::Client { source, .. } => retryable_client(source),
            RegistryError::Stream { .. } => true,
            _ => false,
        }
    }
}

fn retryable_client(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::RequestError(e) => {
            e.is_timeout()
                || e.is_connect()
                || e.is_request()
                || e.is_body()
                || e.status().is_some_and(|s| s.is_server_error())
        }
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

/// The platform to pick from an index, like containerd's default matcher.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Default for Platform {
    /// The platform this binary runs on.
    fn default() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Platform {
            os: "linux".to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// One place to fetch a registry's content from, tried in list order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Endpoint {
    /// `host[:port]` serving `/v2/`.
    pub host: String,
    /// Plain HTTP: for registries configured as insecure.
    #[serde(default)]
    pub plain_http: bool,
    /// Extra PEM CA files trusted besides the system roots.
    #[serde(default)]
    pub ca_files: Vec<PathBuf>,
}

impl Endpoint {
    pub fn https(host: &str) -> Endpoint {
        Endpoint {
            host: host.to_owned(),
            plain_http: false,
            ca_files: Vec::new(),
        }
    }
}

/// Registry access: per-registry endpoints (a registry without an entry is
/// reached over HTTPS at its own name; docker.io at registry-1.docker.io),
/// the platform, and how hard to try.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub hosts: HashMap<String, Vec<Endpoint>>,
    pub platform: Platform,
    /// Layers of one image in flight at once: downloading, then unpacking.
    pub max_concurrent_downloads: usize,
    /// Retries per request after the first attempt.
    pub retries: u32,
    /// First retry delay; doubled each time.
    pub backoff: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub read_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            hosts: HashMap::new(),
            platform: Platform::default(),
            max_concurrent_downloads: 3,
            retries: 3,
            backoff: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Deserialize)]
struct HostsFile {
    #[serde(default)]
    host: HashMap<String, Vec<Endpoint>>,
}

impl RegistryConfig {
    /// Reads endpoint lists from JSON shaped like
    /// `{"host": {"docker.io": [{"host": "mirror:5000", "plain_http": true}, ...]}}`.
    pub fn with_hosts_json(mut self, json: &str) -> Result<Self, RegistryError> {
        let file: HostsFile =
            serde_json::from_str(json).map_err(|e| RegistryError::Config(e.to_string()))?;
        self.hosts.extend(file.host);
        Ok(self)
    }

    /// Endpoints for a registry domain, in the order they are tried.
    pub fn endpoints(&self, domain: &str) -> Vec<Endpoint> {
        match self.hosts.get(domain) {
            Some(list) if !list.is_empty() => list.clone(),
            _ if domain == super::reference::DEFAULT_DOMAIN => {
                vec![Endpoint::https("registry-1.docker.io")]
            }
            _ => vec![Endpoint::https(domain)],
        }
    }
}

/// Credentials as CRI's AuthConfig carries them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    pub username: String,
    pub password: String,
    /// base64 of `username:password`.
    pub auth: String,
    pub server_address: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("username", &self.username)
            .field("server_address", &self.server_address)
            .finish_non_exhaustive()
    }
}

impl AuthConfig {
    /// The form oci-client sends: a registry token is used as the bearer
    /// token as is; username/password or `auth` become basic credentials,
    /// which oci-client also presents to a token server.
    pub fn credentials(&self) -> Result<RegistryAuth, RegistryError> {
        use base64::Engine;
        if !self.registry_token.is_empty() {
            return Ok(RegistryAuth::Bearer(self.registry_token.clone()));
        }
        if !self.username.is_empty() {
            return Ok(RegistryAuth::Basic(
                self.username.clone(),
                self.password.clone(),
            ));
        }
        if !self.auth.is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(self.auth.trim())
                .map_err(|e| RegistryError::Credentials(format!("auth is not base64: {e}")))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| RegistryError::Credentials("auth is not UTF-8".to_owned()))?;
            let (user, pass) = text.split_once(':').ok_or_else(|| {
                RegistryError::Credentials("auth must be base64 of username:password".to_owned())
            })?;
            return Ok(RegistryAuth::Basic(user.to_owned(), pass.to_owned()));
        }
        if !self.identity_token.is_empty() {
            // Exchanged for an access token per registry first: see
            // `identity_token_only` and `Puller::exchange_identity_token`.
            return Err(RegistryError::Credentials(
                "an identity_token must be exchanged at the registry's token server first"
                    .to_owned(),
            ));
        }
        Ok(RegistryAuth::Anonymous)
    }

    /// The identity token, when it is the credential to use (nothing that
    /// takes precedence over it is set).
    pub fn identity_token_only(&self) -> Option<&str> {
        let other =
            !self.registry_token.is_empty() || !self.username.is_empty() || !self.auth.is_empty();
        (!other && !self.identity_token.is_empty()).then_some(self.identity_token.as_str())
    }
}

/// What a pull produced, for the image record.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub manifest_digest: Digest,
    pub index_digest: Option<Digest>,
    pub config_digest: Digest,
    pub layers: Vec<LayerRecord>,
    /// Config plus compressed layer sizes.
    pub size: u64,
    pub user: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub(crate) schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub(crate) media_type: Option<String>,
    #[serde(default)]
    pub(crate) manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub(crate) config: Option<Descriptor>,
    #[serde(default)]
    pub(crate) layers: Option<Vec<Descriptor>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ImageConfig {
    #[serde(default)]
    pub(crate) os: String,
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) config: Option<RunConfig>,
    pub(crate) rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RunConfig {
    #[serde(rename = "User", default)]
    pub(crate) user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RootFs {
    pub(crate) diff_ids: Vec<String>,
}

/// Progress of a pull, for a progress bar; the same facts also go to the
/// `tracing` log. Broadcast: joined (coalesced) pulls report once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullProgress {
    /// The manifest is in: every layer with its size, and whether it is
    /// already present (blob and snapshot), so nothing is fetched for it.
    Resolved {
        image: String,
        layers: Vec<LayerProgress>,
    },
    /// Bytes of one layer blob so far (sent at most every 50 ms per blob,
    /// and when the blob is complete).
    Downloading {
        image: String,
        digest: String,
        done: u64,
        total: u64,
    },
    /// A layer is unpacked into its snapshot (index from 0, bottom layer first).
    LayerReady {
        image: String,
        index: usize,
        of: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerProgress {
    pub digest: String,
    pub size: u64,
    pub present: bool,
}

/// A connected endpoint: the client and the reference rewritten to it.
struct Remote {
    client: oci_client::Client,
    reference: oci_client::Reference,
    endpoint: String,
}

pub struct Puller {
    config: RegistryConfig,
    /// One client per endpoint: it carries the endpoint's TLS roots and the
    /// bearer tokens it obtained.
    clients: Mutex<HashMap<(String, String), oci_client::Client>>,
    progress: tokio::sync::broadcast::Sender<PullProgress>,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Puller {
    pub fn new(config: RegistryConfig) -> Puller {
        Puller {
            config,
            clients: Mutex::new(HashMap::new()),
            // A slow listener loses old events (it sees `Lagged`), never
            // slows the pull.
            progress: tokio::sync::broadcast::channel(1024).0,
        }
    }

    /// Progress events of every pull from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<PullProgress> {
        self.progress.subscribe()
    }

    fn report(&self, event: PullProgress) {
        // No listener is not an error.
        let _ = self.progress.send(event);
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    fn client(
        &self,
        endpoint: &Endpoint,
        auth_key: &str,
    ) -> Result<oci_client::Client, RegistryError> {
        let key = (endpoint.host.clone(), auth_key.to_owned());
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| RegistryError::Config("client cache poisoned".to_owned()))?;
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let mut extra = Vec::new();
        for file in &endpoint.ca_files {
            let data = std::fs::read(file).map_err(|e| {
                RegistryError::Config(format!("read CA file {}: {e}", file.display()))
            })?;
            extra.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let config = ClientConfig {
            protocol: if endpoint.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates: extra,
            // We select platforms ourselves from the raw index.
            platform_resolver: None,
            connect_timeout: Some(self.config.connect_timeout),
            read_timeout: Some(self.config.read_timeout),
            ..ClientConfig::default()
        };
        let client = oci_client::Client::try_from(config)
            .map_err(|e| RegistryError::Config(format!("endpoint {}: {e}", endpoint.host)))?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Docker's identity token is an OAuth2 refresh token: the registry's
    /// bearer challenge (on `/v2/`) names the token realm, where we POST
    /// `grant_type=refresh_token` for a pull-scoped access token, used as a
    /// bearer token from then on. Endpoints are tried in order. A registry
    /// that asks for no bearer token gets an anonymous pull.
    pub async fn exchange_identity_token(
        &self,
        reference: &Reference,
        refresh_token: &str,
    ) -> Result<RegistryAuth, RegistryError> {
        let mut last = None;
        for endpoint in self.config.endpoints(reference.domain()) {
            match self.exchange_at(&endpoint, reference, refresh_token).await {
                Ok(auth) => return Ok(auth),
                Err(e @ RegistryError::Unauthorized { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(endpoint = %endpoint.host, error = %e, "token exchange failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            RegistryError::Config(format!("no endpoints for {}", reference.domain()))
        }))
    }

    async fn exchange_at(
        &self,
        endpoint: &Endpoint,
        reference: &Reference,
        refresh_token: &str,
    ) -> Result<RegistryAuth, RegistryError> {
        let name = reference.to_string();
        let fail = |detail: String| RegistryError::Task {
            reference: name.clone(),
            detail: format!("identity token exchange: {detail}"),
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(self.config.connect_timeout)
            .read_timeout(self.config.read_timeout);
        let mut roots = Vec::new();
        for file in &endpoint.ca_files {
            let pem = std::fs::read(file).map_err(|e| {
                RegistryError::Config(format!("read CA file {}: {e}", file.display()))
            })?;
            roots.push(
                reqwest::Certificate::from_pem(&pem).map_err(|e| {
                    RegistryError::Config(format!("CA file {}: {e}", file.display()))
                })?,
            );
        }
        if !roots.is_empty() {
            builder = builder.tls_certs_merge(roots);
        }
        let client = builder
            .build()
            .map_err(|e| RegistryError::Config(format!("endpoint {}: {e}", endpoint.host)))?;
        let scheme = if endpoint.plain_http { "http" } else { "https" };
        let ping = client
            .get(format!("{scheme}://{}/v2/", endpoint.host))
            .send()
            .await
            .map_err(|e| {
                fail(format!(
                    "GET /v2/ on {}: {}",
                    endpoint.host,
                    error_chain(&e)
                ))
            })?;
        let challenge = ping
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .and_then(parse_bearer_challenge);
        let Some(params) = challenge else {
            return Ok(RegistryAuth::Anonymous);
        };
        let realm = params
            .get("realm")
            .ok_or_else(|| fail("bearer challenge without a realm".to_owned()))?;
        let scope = format!("repository:{}:pull", reference.repository());
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", "bosun"),
            ("scope", scope.as_str()),
        ];
        if let Some(service) = params.get("service") {
            form.push(("service", service));
        }
        let response = client
            .post(realm)
            .form(&form)
            .send()
            .await
            .map_err(|e| fail(format!("POST {realm}: {}", error_chain(&e))))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                reference: name.clone(),
                detail: format!("token server {realm} refused the identity token ({status})"),
            });
        }
        if !status.is_success() {
            return Err(fail(format!("token server {realm}: {status}")));
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            access_token: String,
            #[serde(default)]
            token: String,
        }
        let body: TokenResponse = response
            .json()
            .await
            .map_err(|e| fail(format!("token server {realm}: {e}")))?;
        let token = if body.access_token.is_empty() {
            body.token
        } else {
            body.access_token
        };
        if token.is_empty() {
            return Err(fail(format!("token server {realm} returned no token")));
        }
        Ok(RegistryAuth::Bearer(token))
    }

    /// Pulls `reference` into `store`: manifest, config and layers verified
    /// and stored, every layer unpacked into its snapshot.
    pub async fn pull(
        &self,
        store: Arc<ContentStore>,
        reference: &Reference,
        auth: &RegistryAuth,
    ) -> Result<PulledImage, RegistryError> {
        let started = Instant::now();
        let name = reference.to_string();
        let auth_key = format!("{auth:?}{}", auth_fingerprint(auth));
        let mut last_err = None;
        let mut found = None;
        for endpoint in self.config.endpoints(reference.domain()) {
            let client = self.client(&endpoint, &auth_key)?;
            let remote = Remote {
                reference: oci_client::Reference::with_tag(
                    endpoint.host.clone(),
                    reference.repository().to_owned(),
                    "latest".to_owned(),
                ),
                client,
                endpoint: endpoint.host.clone(),
            };
            match self
                .fetch_manifest(&remote, auth, &name, &reference.object())
                .await
            {
                Ok(bytes) => {
                    found = Some((remote, bytes));
                    break;
                }
                Err(e) => {
                    tracing::warn!(endpoint = %endpoint.host, error = %e, "endpoint failed");
                    last_err = Some(e);
                }
            }
        }
        let (remote, bytes) = match (found, last_err) {
            (Some(found), _) => found,
            (None, Some(e)) => return Err(e),
            (None, None) => {
                return Err(RegistryError::Config(format!(
                    "no endpoints for {}",
                    reference.domain()
                )))
            }
        };
        tracing::info!(image = %name, endpoint = %remote.endpoint, "resolved manifest");

        let top = sha256_digest(&bytes);
        if let Some(pinned) = reference.digest() {
            if *pinned != top {
                return Err(RegistryError::ManifestDigest {
                    reference: name,
                    what: "manifest",
                    expected: pinned.to_string(),
                    actual: top.to_string(),
                });
            }
        }
        let manifest = parse_manifest(&name, &bytes)?;
        let store_err = |source| RegistryError::Store {
            reference: name.clone(),
            source,
        };
        let (manifest_digest, index_digest, manifest, selected) = if manifest.manifests.is_some() {
            let chosen = select_platform(&name, &manifest, &self.config.platform)?;
            let digest: Digest = parse_digest(&name, &chosen.digest)?;
            let child = self
                .fetch_manifest(&remote, auth, &name, &digest.to_string())
                .await?;
            let actual = sha256_digest(&child);
            if actual != digest || child.len() as u64 != chosen.size {
                return Err(RegistryError::ManifestDigest {
                    reference: name,
                    what: "platform manifest",
                    expected: format!("{digest} ({} bytes)", chosen.size),
                    actual: format!("{actual} ({} bytes)", child.len()),
                });
            }
            let parsed = parse_manifest(&name, &child)?;
            if parsed.manifests.is_some() {
                return Err(invalid(&name, "an index inside an index is not supported"));
            }
            store.put_blob(&top, &bytes).map_err(store_err)?;
            store.put_blob(&digest, &child).map_err(store_err)?;
            (digest, Some(top), parsed, true)
        } else {
            store.put_blob(&top, &bytes).map_err(store_err)?;
            (top, None, manifest, false)
        };

        let config_desc = manifest
            .config
            .as_ref()
            .ok_or_else(|| invalid(&name, "manifest has no config"))?;
        let layers = manifest
            .layers
            .as_ref()
            .ok_or_else(|| invalid(&name, "manifest has no layers"))?;
        for layer in layers {
            if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
                return Err(invalid(
                    &name,
                    &format!(
                        "layer {} has unsupported media type {:?}",
                        layer.digest, layer.media_type
                    ),
                ));
            }
        }
        if config_desc.size as usize > MAX_MANIFEST_BYTES {
            return Err(invalid(&name, "config larger than 4 MiB"));
        }
        let config_digest = parse_digest(&name, &config_desc.digest)?;
        self.fetch_blob(
            &remote,
            auth,
            &name,
            &store,
            &config_digest,
            config_desc.size,
        )
        .await?;
        let config_bytes = store.read_blob(&config_digest).map_err(store_err)?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| invalid(&name, &format!("config {config_digest}: {e}")))?;
        let wanted = &self.config.platform;
        if !selected && (config.os != wanted.os || config.architecture != wanted.architecture) {
            return Err(RegistryError::Platform {
                reference: name,
                wanted: wanted.to_string(),
                available: format!("{}/{}", config.os, config.architecture),
            });
        }
        if config.rootfs.diff_ids.len() != layers.len() {
            return Err(invalid(
                &name,
                &format!(
                    "{} layers but {} diff_ids in the config",
                    layers.len(),
                    config.rootfs.diff_ids.len()
                ),
            ));
        }
        let chain_ids = unpack::chain_ids(&config.rootfs.diff_ids);
        let snapshots = store.snapshots_dir().to_owned();

        // Fetch and unpack up to N layers at once; each is committed as soon
        // as the layers below it are in place.
        let total = layers.len();
        self.report(PullProgress::Resolved {
            image: name.clone(),
            layers: layers
                .iter()
                .zip(&chain_ids)
                .map(|(l, chain)| LayerProgress {
                    digest: l.digest.clone(),
                    size: l.size,
                    present: unpack::snapshot_path(&snapshots, chain).is_dir()
                        && parse_digest(&name, &l.digest).is_ok_and(|d| store.has_blob(&d)),
                })
                .collect(),
        });
        let mut digests = Vec::with_capacity(total);
        for layer in layers {
            digests.push(parse_digest(&name, &layer.digest)?);
        }
        // (A Vec of boxed futures rather than a mapping closure: closures
        // borrowing here trip rustc's Send inference for spawned callers.)
        let mut blobs: Vec<futures_util::future::BoxFuture<'_, Result<File, RegistryError>>> =
            Vec::with_capacity(total);
        for ((layer, chain), digest) in layers.iter().zip(&chain_ids).zip(&digests) {
            let name = name.clone();
            let store = store.clone();
            let remote = &remote;
            let have_snapshot = unpack::snapshot_path(&snapshots, chain).is_dir();
            blobs.push(Box::pin(async move {
                if !(have_snapshot && store.has_blob(digest)) {
                    self.fetch_blob(remote, auth, &name, &store, digest, layer.size)
                        .await?;
                }
                store
                    .open_blob(digest)
                    .map_err(|source| RegistryError::Store {
                        reference: name,
                        source,
                    })
            }));
        }
        unpack::unpack_image(
            &snapshots,
            &chain_ids,
            &config.rootfs.diff_ids,
            self.config.max_concurrent_downloads,
            blobs,
            |i, source| RegistryError::Unpack {
                reference: name.clone(),
                digest: digests[i].to_string(),
                source,
            },
            |i, unpacked| {
                tracing::info!(
                    image = %name,
                    layer = i + 1,
                    of = total,
                    digest = %digests[i],
                    created = unpacked.created,
                    "layer ready"
                );
                self.report(PullProgress::LayerReady {
                    image: name.clone(),
                    index: i,
                    of: total,
                });
            },
        )
        .await?;
        let records = layers
            .iter()
            .zip(&digests)
            .zip(config.rootfs.diff_ids.iter().zip(&chain_ids))
            .map(|((layer, digest), (diff_id, chain))| LayerRecord {
                digest: digest.to_string(),
                size: layer.size,
                media_type: layer.media_type.clone(),
                diff_id: diff_id.clone(),
                chain_id: chain.clone(),
            })
            .collect();
        let size = config_desc.size + layers.iter().map(|l| l.size).sum::<u64>();
        tracing::info!(image = %name, bytes = size, elapsed_ms = started.elapsed().as_millis() as u64, "pulled");
        Ok(PulledImage {
            manifest_digest,
            index_digest,
            config_digest,
            layers: records,
            size,
            user: config.config.and_then(|c| c.user).unwrap_or_default(),
        })
    }

    async fn fetch_manifest(
        &self,
        remote: &Remote,
        auth: &RegistryAuth,
        name: &str,
        object: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let reference = if object.contains(':') {
            oci_client::Reference::with_digest(
                remote.reference.registry().to_owned(),
                remote.reference.repository().to_owned(),
                object.to_owned(),
            )
        } else {
            oci_client::Reference::with_tag(
                remote.reference.registry().to_owned(),
                remote.reference.repository().to_owned(),
                object.to_owned(),
            )
        };
        let what = format!("fetch manifest {object} from {}", remote.endpoint);
        let bytes = self
            .retrying(name, &what, || async {
                remote
                    .client
                    .pull_manifest_raw(&reference, auth, ACCEPTED_MANIFESTS)
                    .await
                    .map(|(bytes, _)| bytes)
                    .map_err(|source| classify(name, &what, source))
            })
            .await?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(invalid(name, "manifest larger than 4 MiB"));
        }
        Ok(bytes.to_vec())
    }

    /// Streams one blob into the store, verified by size and digest.
    async fn fetch_blob(
        &self,
        remote: &Remote,
        auth: &RegistryAuth,
        name: &str,
        store: &ContentStore,
        digest: &Digest,
        size: u64,
    ) -> Result<(), RegistryError> {
        if store.has_blob(digest) {
            return Ok(());
        }
        // oci-client sends auth only for a registry it has seen: prime it.
        remote
            .client
            .store_auth_if_needed(remote.reference.resolve_registry(), auth)
            .await;
        let what = format!("fetch blob {digest} from {}", remote.endpoint);
        let store_err = |source| RegistryError::Store {
            reference: name.to_owned(),
            source,
        };
        self.retrying(name, &what, || async {
            let mut writer = store.writer(digest, Some(size)).map_err(store_err)?;
            let mut stream = remote
                .client
                .pull_blob_stream(&remote.reference, digest.to_string().as_str())
                .await
                .map_err(|source| classify(name, &what, source))?;
            let started = Instant::now();
            let mut last_report = Instant::now();
            let mut last_event = Instant::now();
            loop {
                match stream.next().await {
                    Some(Ok(chunk)) => {
                        writer.write_chunk(&chunk).map_err(store_err)?;
                        if last_event.elapsed() >= Duration::from_millis(50) || writer.written() == size {
                            last_event = Instant::now();
                            self.report(PullProgress::Downloading {
                                image: name.to_owned(),
                                digest: digest.to_string(),
                                done: writer.written(),
                                total: size,
                            });
                        }
                        if last_report.elapsed() >= Duration::from_secs(2) {
                            last_report = Instant::now();
                            tracing::info!(image = name, %digest, done = writer.written(), total = size, "downloading");
                        }
                    }
                    // oci-client reports its own digest check as a stream
                    // error at the end: with every byte in, our check speaks.
                    Some(Err(e)) if writer.written() == size => {
                        tracing::debug!(error = %e, "client stream error after full size");
                        break;
                    }
                    Some(Err(e)) => {
                        return Err(RegistryError::Stream {
                            reference: name.to_owned(),
                            digest: digest.to_string(),
                            detail: format!("{e} after {} of {size} bytes", writer.written()),
                        })
                    }
                    None => break,
                }
            }
            let written = writer.written();
            tokio::task::spawn_blocking(move || writer.commit())
                .await
                .map_err(|e| RegistryError::Task {
                    reference: name.to_owned(),
                    detail: format!("commit task: {e}"),
                })?
                .map_err(store_err)?;
            tracing::debug!(%digest, bytes = written, ms = started.elapsed().as_millis() as u64, "blob stored");
            Ok(())
        })
        .await
    }

    async fn retrying<T, F, Fut>(
        &self,
        name: &str,
        what: &str,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut delay = self.config.backoff;
        let mut tries = 0;
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable() && tries < self.config.retries => {
                    tries += 1;
                    tracing::warn!(image = name, what, error = %e, retry = tries, ?delay, "retrying");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// `Bearer realm="…",service="…",scope="…"` → its parameters; None for
/// any other scheme.
fn parse_bearer_challenge(header: &str) -> Option<HashMap<String, String>> {
    let rest = header.trim();
    let (scheme, rest) = rest.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_once(',').unwrap_or((after, "")),
        };
        params.insert(key.trim().to_ascii_lowercase(), value.to_owned());
        rest = after.trim_start_matches([',', ' ']);
    }
    Some(params)
}

/// An HTTP error with its causes (reqwest's own message hides them).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out = format!("{out}: {s}");
        source = s.source();
    }
    out
}

/// Distinguishes credentials in the client cache key without keeping the
/// secret in memory twice: a hash of it.
fn auth_fingerprint(auth: &RegistryAuth) -> String {
    let secret = match auth {
        RegistryAuth::Anonymous => String::new(),
        RegistryAuth::Basic(u, p) => format!("{u}\0{p}"),
        RegistryAuth::Bearer(t) => t.clone(),
    };
    sha256_digest(secret.as_bytes()).to_string()
}

fn classify(name: &str, what: &str, source: OciDistributionError) -> RegistryError {
    match &source {
        OciDistributionError::ImageManifestNotFoundError(d) => RegistryError::NotFound {
            reference: name.to_owned(),
            detail: d.clone(),
        },
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                        | oci_client::errors::OciErrorCode::BlobUnknown
                        | oci_client::errors::OciErrorCode::NameUnknown
                )
            }) =>
        {
            RegistryError::NotFound {
                reference: name.to_owned(),
                detail: source.to_string(),
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => RegistryError::NotFound {
            reference: name.to_owned(),
            detail: source.to_string(),
        },
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => RegistryError::Unauthorized {
            reference: name.to_owned(),
            detail: source.to_string(),
        },
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    oci_client::errors::OciErrorCode::Unauthorized
                        | oci_client::errors::OciErrorCode::Denied
                )
            }) =>
        {
            RegistryError::Unauthorized {
                reference: name.to_owned(),
                detail: source.to_string(),
            }
        }
        _ => RegistryError::Client {
            reference: name.to_owned(),
            what: what.to_owned(),
            source,
        },
    }
}

fn invalid(name: &str, detail: &str) -> RegistryError {
    RegistryError::Invalid {
        reference: name.to_owned(),
        detail: detail.to_owned(),
    }
}

fn parse_digest(name: &str, s: &str) -> Result<Digest, RegistryError> {
    s.parse()
        .map_err(|e: super::reference::ReferenceError| invalid(name, &e.to_string()))
}

pub(crate) fn parse_manifest(name: &str, bytes: &[u8]) -> Result<Manifest, RegistryError> {
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| invalid(name, &format!("manifest: {e}")))?;
    if manifest.schema_version != 2 {
        return Err(invalid(
            name,
            &format!(
                "schema version {} is not supported",
                manifest.schema_version
            ),
        ));
    }
    if let Some(mt) = &manifest.media_type {
        if !ACCEPTED_MANIFESTS.contains(&mt.as_str()) {
            return Err(invalid(
                name,
                &format!("unsupported manifest media type {mt:?}"),
            ));
        }
    }
    Ok(manifest)
}

/// The first entry for the wanted os/architecture; the variant must match
/// when both sides give one (as containerd's default matcher does for amd64).
pub(crate) fn select_platform<'a>(
    name: &str,
    index: &'a Manifest,
    wanted: &Platform,
) -> Result<&'a Descriptor, RegistryError> {
    let entries = index.manifests.as_deref().unwrap_or_default();
    entries
        .iter()
        .find(|d| {
            d.platform.as_ref().is_some_and(|p| {
                p.os == wanted.os
                    && p.architecture == wanted.architecture
                    && match (&wanted.variant, &p.variant) {
                        (Some(w), Some(v)) => w == v,
                        _ => true,
                    }
            })
        })
        .ok_or_else(|| RegistryError::Platform {
            reference: name.to_owned(),
            wanted: wanted.to_string(),
            available: {
                let list: Vec<String> = entries
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                    .collect();
                if list.is_empty() {
                    "no platforms".to_owned()
                } else {
                    list.join(", ")
                }
            },
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn index(platforms: &[(&str, &str, Option<&str>)]) -> Manifest {
        let manifests = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                serde_json::json!({
                    "mediaType": MEDIA_OCI_MANIFEST,
                    "digest": format!("sha256:{:064x}", i),
                    "size": 1,
                    "platform": {"os": os, "architecture": arch, "variant": variant}
                })
            })
            .collect::<Vec<_>>();
        let json = serde_json::json!({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": manifests});
        parse_manifest("x", json.to_string().as_bytes()).unwrap()
    }

    fn platform(os: &str, arch: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
        }
    }

    #[test]
    fn parses_bearer_challenges() {
        let p = parse_bearer_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        assert!(parse_bearer_challenge(r#"Basic realm="x""#).is_none());
        let a = AuthConfig {
            identity_token: "t".into(),
            ..AuthConfig::default()
        };
        assert_eq!(a.identity_token_only(), Some("t"));
        let b = AuthConfig {
            username: "u".into(),
            ..a
        };
        assert_eq!(b.identity_token_only(), None);
    }

    #[test]
    fn selects_platform_from_index() {
        let idx = index(&[
            ("linux", "arm", Some("v7")),
            ("linux", "amd64", None),
            ("windows", "amd64", None),
        ]);
        let d = select_platform("x", &idx, &platform("linux", "amd64", None)).unwrap();
        assert_eq!(d.digest, format!("sha256:{:064x}", 1));
        let d = select_platform("x", &idx, &platform("linux", "arm", Some("v7"))).unwrap();
        assert_eq!(d.digest, format!("sha256:{:064x}", 0));
        let err = select_platform("x", &idx, &platform("linux", "arm", Some("v6"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x: no manifest for platform linux/arm/v6; the image has linux/arm/v7, linux/amd64, windows/amd64"
        );
    }

    #[test]
    fn rejects_bad_manifests() {
        assert!(parse_manifest("x", b"{}").is_err());
        assert!(parse_manifest("x", br#"{"schemaVersion":1}"#).is_err());
        assert!(parse_manifest("x", br#"{"schemaVersion":2,"mediaType":"text/plain"}"#).is_err());
        assert!(parse_manifest("x", b"not json").is_err());
        let ok = parse_manifest(
            "x",
            br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
                "config":{"mediaType":"a","digest":"sha256:00","size":1},"layers":[]}"#,
        )
        .unwrap();
        assert!(ok.manifests.is_none());
    }

    #[test]
    fn credentials_from_auth_config() {
        let anon = AuthConfig::default();
        assert_eq!(anon.credentials().unwrap(), RegistryAuth::Anonymous);
        let basic = AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        assert_eq!(
            basic.credentials().unwrap(),
            RegistryAuth::Basic("u".into(), "p".into())
        );
        let auth = AuthConfig {
            auth: "dTpwOng=".into(), // u:p:x
            ..Default::default()
        };
        assert_eq!(
            auth.credentials().unwrap(),
            RegistryAuth::Basic("u".into(), "p:x".into())
        );
        let token = AuthConfig {
            registry_token: "tok".into(),
            username: "u".into(),
            ..Default::default()
        };
        assert_eq!(
            token.credentials().unwrap(),
            RegistryAuth::Bearer("tok".into())
        );
        let bad = AuthConfig {
            auth: "!!".into(),
            ..Default::default()
        };
        assert!(bad.credentials().is_err());
        let identity = AuthConfig {
            identity_token: "refresh".into(),
            ..Default::default()
        };
        assert!(identity.credentials().is_err());
        let secret = AuthConfig {
            username: "u".into(),
            password: "s3cret".into(),
            ..Default::default()
        };
        assert!(!format!("{secret:?}").contains("s3cret"));
    }

    #[test]
    fn endpoints_default_and_configured() {
        let config = RegistryConfig::default()
            .with_hosts_json(r#"{"host":{"docker.io":[{"host":"mirror:5000","plain_http":true},{"host":"registry-1.docker.io"}]}}"#)
            .unwrap();
        let eps = config.endpoints("docker.io");
        assert_eq!(eps.len(), 2);
        assert!(eps[0].plain_http);
        assert_eq!(eps[1], Endpoint::https("registry-1.docker.io"));
        assert_eq!(
            RegistryConfig::default().endpoints("docker.io"),
            vec![Endpoint::https("registry-1.docker.io")]
        );
        assert_eq!(
            RegistryConfig::default().endpoints("quay.io"),
            vec![Endpoint::https("quay.io")]
        );
        assert!(RegistryConfig::default().with_hosts_json("{").is_err());
    }

    #[test]
    fn retry_classification() {
        let server = |code| RegistryError::Client {
            reference: "x".into(),
            what: "w".into(),
            source: OciDistributionError::ServerError {
                code,
                url: "u".into(),
                message: "m".into(),
            },
        };
        assert!(server(500).retryable());
        assert!(server(503).retryable());
        assert!(server(429).retryable());
        assert!(!server(400).retryable());
        assert!(!invalid("x", "y").retryable());
        let store = RegistryError::Store {
            reference: "x".into(),
            source: StoreError::SizeMismatch {
                digest: sha256_digest(b""),
                expected: 1,
                actual: 2,
            },
        };
        assert!(!store.retryable());
    }
}
