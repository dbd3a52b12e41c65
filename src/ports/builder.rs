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
}

#[derive(Debug)]
pub struct BuildRequest {
    pub context: SealedContext,
    pub options: BuildOptions,
    /// Registry host (`docker.io` for Docker Hub) → credentials, for the `FROM` lines: the job's
    /// sub-registry credentials over the node's.
    pub registry_auth: Vec<(String, BasicAuth)>,
    pub destination: Destination,
}
