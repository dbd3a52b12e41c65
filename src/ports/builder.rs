//! Building an image from a sealed context.

use async_trait::async_trait;

use super::{BasicAuth, Destination, SealedContext, StageContext};
use crate::error::JobError;
use crate::job::{BuildOptions, ImageInfo};

/// Builds through BuildKit and exports the image to the destination (ARCHITECTURE §7). Base
/// images are always pulled with the request's credentials; build log lines are emitted as
/// redacted `Log` events; cancellation stops the build in BuildKit.
#[async_trait]
pub trait Builder: Send + Sync {
    async fn build(&self, request: BuildRequest, cx: &StageContext) -> Result<ImageInfo, JobError>;

    /// Whether the build backend answers now (for `/readyz`); the reason when it does not.
    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// Prunes the backend's build cache (BuildKit's) down to at most `keep_bytes`, least
    /// recently used records first, and says what the cache held and what went. Background
    /// housekeeping, not part of any job (`builder.cache_keep_bytes`): the error is a
    /// classified, explained sentence that names no credential.
    ///
    /// A cache already at or under `keep_bytes` is not touched. `keep_bytes` = 0 leaves the
    /// cache alone (as `builder.cache_keep_bytes = 0` does); it never means "prune everything".
    /// The default: a backend without a cache of its own, nothing to prune.
    async fn prune_cache(&self, keep_bytes: u64) -> Result<CachePrune, String> {
        let _ = keep_bytes;
        Ok(CachePrune::default())
    }
}

/// What [`Builder::prune_cache`] found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CachePrune {
    /// Bytes the cache held before the prune: its records not shared with an image, as
    /// `docker system df` and BuildKit's own limit count them.
    pub before_bytes: u64,
    /// Bytes the prune reclaimed, as the backend reported them (0 when nothing was pruned).
    pub reclaimed_bytes: u64,
}

impl CachePrune {
    /// What the cache holds after the prune, as far as the two figures tell.
    pub fn after_bytes(&self) -> u64 {
        self.before_bytes.saturating_sub(self.reclaimed_bytes)
    }
}

#[derive(Debug)]
pub struct BuildRequest {
    pub context: SealedContext,
    pub options: BuildOptions,
    /// Registry host (`docker.io` for Docker Hub) → credentials, for the `FROM` lines: the job's
    /// sub-registry credentials over the node's.
    pub registry_auth: Vec<(String, BasicAuth)>,
    pub destination: Destination,
    /// The fleet's shared build cache for this build's source (`[builder.cache]`), if any.
    pub cache: Option<BuildCache>,
}

/// Where a build imports its cache from and exports it to: one source's repository in the
/// fleet's cache registry. Its credentials are the node's and go only to the cache registry
/// (the BuildKit session's Auth for that host, or the engine's push), never into the build's
/// arguments or steps.
#[derive(Debug, Clone)]
pub struct BuildCache {
    /// `host[:port]`.
    pub registry: String,
    /// Plain HTTP to the registry (configured so; loopback registries are plain HTTP to
    /// BuildKit and the engine anyway).
    pub plain_http: bool,
    /// The source's repository, rendered.
    pub repository: String,
    pub auth: Option<BasicAuth>,
    /// Import the cache (not with the job's `no_cache`); the build's cache is exported either
    /// way.
    pub import: bool,
}

impl BuildCache {
    /// `registry/repository:tag`.
    pub fn reference(&self, tag: &str) -> String {
        format!("{}/{}:{tag}", self.registry, self.repository)
    }
}
