//! Stand-ins for stages whose adapters are not part of this build yet. Each fails the job
//! permanently with an `unsupported` error that says so; nothing pretends to work.

use async_trait::async_trait;

use crate::error::{ErrorCode, JobError, Stage};
use crate::job::{DockerFile, ImageInfo, Origin};
use crate::ports::{
    BasicAuth, BuildRequest, Builder, CredentialResolver, FetchedSource, Fetcher, ImportRequest,
    Importer, StageContext,
};

#[derive(Debug, Clone, Copy, Default)]
pub struct NotInThisBuild;

fn unsupported(stage: Stage, what: &str) -> JobError {
    JobError::permanent(
        stage,
        ErrorCode::Unsupported,
        format!("{what} are not supported by this build of factoryd yet"),
    )
}

#[async_trait]
impl Fetcher for NotInThisBuild {
    async fn fetch(&self, _: &DockerFile, _: &StageContext) -> Result<FetchedSource, JobError> {
        Err(unsupported(Stage::Fetch, "git and tar.gz sources"))
    }
}

#[async_trait]
impl Builder for NotInThisBuild {
    async fn build(&self, _: BuildRequest, _: &StageContext) -> Result<ImageInfo, JobError> {
        Err(unsupported(Stage::Build, "Dockerfile builds"))
    }
}

#[async_trait]
impl CredentialResolver for NotInThisBuild {
    async fn resolve(
        &self,
        _: &Origin,
        _: bool,
        _: &StageContext,
    ) -> Result<Option<BasicAuth>, JobError> {
        Err(unsupported(Stage::Resolve, "registry credentials"))
    }
}

#[async_trait]
impl Importer for NotInThisBuild {
    async fn import(&self, _: ImportRequest<'_>, _: &StageContext) -> Result<ImageInfo, JobError> {
        Err(unsupported(Stage::Import, "registry imports"))
    }
}
