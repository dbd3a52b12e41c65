//! Importing an image from a registry, and resolving the credentials to do it.

use async_trait::async_trait;

use super::{BasicAuth, Destination, StageContext};
use crate::error::JobError;
use crate::job::{ImageInfo, Origin};
use crate::reference::Reference;

/// Resolves an import origin's credentials: static (user/token, password), webhook (HTTP GET →
/// base64 `username:password`) or provider (AWS ECR `GetAuthorizationToken`).
#[async_trait]
pub trait CredentialResolver: Send + Sync {
    /// `None` for anonymous access. `fresh` bypasses any cache (after a 401 mid-import).
    async fn resolve(
        &self,
        origin: &Origin,
        fresh: bool,
        cx: &StageContext,
    ) -> Result<Option<BasicAuth>, JobError>;
}

/// Copies an image from its source registry to the destination: streamed, verified, parallel,
/// skipping blobs the destination has (ARCHITECTURE §8).
#[async_trait]
pub trait Importer: Send + Sync {
    async fn import(
        &self,
        request: ImportRequest<'_>,
        cx: &StageContext,
    ) -> Result<ImageInfo, JobError>;
}

pub struct ImportRequest<'a> {
    pub origin: &'a Origin,
    pub source: Reference,
    /// The source registry is reached over plain HTTP (configured insecure, or an explicit
    /// `http://` url that the config allows).
    pub plain_http: bool,
    pub auth: Option<BasicAuth>,
    /// To refresh `auth` once after a 401 in the middle of a long import.
    pub resolver: &'a dyn CredentialResolver,
    pub destination: Destination,
}
