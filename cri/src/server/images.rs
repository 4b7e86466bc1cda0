//! CRI ImageService over gRPC: a thin translation onto
//! [`crate::image::service::ImageService`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService as CriImageService;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::image::registry::{AuthConfig, RegistryError};
use crate::image::service::{Image, ImageService, ServiceError};

/// Decides whether an image may go: the runtime side refuses to remove an
/// image a container still runs from (its layers back the container's
/// root filesystem), as CRI-O does.
pub trait ImageUsers: Send + Sync + 'static {
    /// IDs of containers created from image `image_id`.
    fn containers_using(&self, image_id: &str) -> Vec<String>;
}

/// The gRPC face of the image service.
pub struct Images {
    service: ImageService,
    users: Arc<dyn ImageUsers>,
}

impl Images {
    /// Serves `service`, asking `users` before removing an image.
    pub fn new(service: ImageService, users: Arc<dyn ImageUsers>) -> Self {
        Self { service, users }
    }
}

/// Maps library errors to gRPC codes: bad references are the caller's
/// fault, an image or tag the registry does not have is NotFound (as
/// containerd answers), other registry answers keep their message, the
/// rest is internal.
pub fn status_of(err: ServiceError) -> Status {
    match &err {
        ServiceError::Reference(_) => Status::invalid_argument(err.to_string()),
        ServiceError::Pull { source, .. } if matches!(**source, RegistryError::NotFound { .. }) => {
            Status::not_found(err.to_string())
        }
        ServiceError::Pull { .. } => Status::unknown(err.to_string()),
        _ => Status::internal(err.to_string()),
    }
}

fn to_cri(image: Image) -> cri::Image {
    cri::Image {
        id: image.id,
        repo_tags: image.repo_tags,
        repo_digests: image.repo_digests,
        size: image.size,
        uid: image.uid.map(|value| cri::Int64Value { value }),
        username: image.username,
        spec: None,
        pinned: false,
    }
}

/// How long the client will wait (its `grpc-timeout`), a millisecond
/// short: tonic's own timer answers a passed deadline with CANCELLED,
/// where a gRPC server should say DEADLINE_EXCEEDED (as containerd does and
/// critest checks), so ours must fire first.
fn client_deadline(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let unit_at = value.len().checked_sub(1)?;
    let (amount, unit) = value.split_at(unit_at);
    // At most 8 digits, as the gRPC spec says.
    let amount: u64 = amount.parse().ok().filter(|_| amount.len() <= 8)?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Some(timeout.saturating_sub(Duration::from_millis(1)))
}

fn image_name(spec: Option<&cri::ImageSpec>) -> Result<&str, Status> {
    spec.map(|s| s.image.as_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Status::invalid_argument("image is required (ImageSpec.image is empty)"))
}

#[tonic::async_trait]
impl CriImageService for Images {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = request
            .get_ref()
            .filter
            .as_ref()
            .and_then(|f| f.image.as_ref())
            .map(|s| s.image.as_str())
            .filter(|s| !s.is_empty());
        let images = self.service.list_images(filter).map_err(status_of)?;
        Ok(Response::new(cri::ListImagesResponse {
            images: images.into_iter().map(to_cri).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        // An unknown image is not an error: the answer has no image.
        let image = self.service.image_status(name).map_err(status_of)?;
        let mut info = HashMap::new();
        if request.verbose {
            if let Some(image) = &image {
                let record = self
                    .service
                    .store()
                    .get_image(&image.id)
                    .map_err(|e| Status::internal(e.to_string()))?;
                if let Some(record) = record {
                    info.insert(
                        "info".to_owned(),
                        serde_json::to_string(&record).unwrap_or_default(),
                    );
                }
            }
        }
        Ok(Response::new(cri::ImageStatusResponse {
            image: image.map(to_cri),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let deadline = client_deadline(request.metadata());
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?.to_owned();
        let auth = request.auth.map(|a| AuthConfig {
            username: a.username,
            password: a.password,
            auth: a.auth,
            server_address: a.server_address,
            identity_token: a.identity_token,
            registry_token: a.registry_token,
        });
        let pull = self.service.pull_image(&name, auth.as_ref());
        let pulled = match deadline {
            Some(limit) => tokio::time::timeout(limit, pull).await.map_err(|_| {
                Status::deadline_exceeded(format!("pull {name}: the client's deadline passed"))
            })?,
            None => pull.await,
        };
        let image_ref = pulled.map_err(status_of)?;
        tracing::info!(image = %name, %image_ref, "pulled image");
        Ok(Response::new(cri::PullImageResponse { image_ref }))
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let name = image_name(request.get_ref().image.as_ref())?.to_owned();
        if let Some(image) = self.service.image_status(&name).map_err(status_of)? {
            let users = self.users.containers_using(&image.id);
            if !users.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "image {name} ({}) is in use by container(s) {}",
                    image.id,
                    users.join(", ")
                )));
            }
        }
        self.service.remove_image(&name).await.map_err(status_of)?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let usage = self.service.image_fs_info().map_err(status_of)?;
        let image_filesystems: Vec<cri::FilesystemUsage> = usage
            .into_iter()
            .map(|u| cri::FilesystemUsage {
                timestamp: u.timestamp_ns,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: u.mountpoint.display().to_string(),
                }),
                used_bytes: Some(cri::UInt64Value {
                    value: u.used_bytes,
                }),
                inodes_used: Some(cri::UInt64Value {
                    value: u.inodes_used,
                }),
            })
            .collect();
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems,
            container_filesystems: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn deadline(value: &str) -> Option<Duration> {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        client_deadline(&metadata)
    }

    #[test]
    fn client_deadline_is_a_millisecond_short() {
        assert_eq!(deadline("1m"), Some(Duration::ZERO));
        assert_eq!(deadline("2S"), Some(Duration::from_millis(1999)));
        assert_eq!(deadline("5M"), Some(Duration::from_millis(299_999)));
        assert_eq!(deadline("999000u"), Some(Duration::from_millis(998)));
        assert_eq!(client_deadline(&MetadataMap::new()), None);
        for bad in ["", "m", "12", "1x", "123456789S", "-1S"] {
            assert_eq!(deadline(bad), None, "{bad:?}");
        }
    }
}
