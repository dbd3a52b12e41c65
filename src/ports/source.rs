//! Fetching a docker-file job's source and sealing it into a build context.

use async_trait::async_trait;

use super::StageContext;
use crate::error::JobError;
use crate::job::{DockerFile, Revision};

/// Fetches a source (a bare git object database, or the archive) into the job's workspace and
/// seals it: resolves `context_dir` and `build_file` inside it and yields the context stream.
/// Nothing untrusted is extracted onto the node (ARCHITECTURE §6).
#[async_trait]
pub trait Fetcher: Send + Sync {
    async fn fetch(
        &self,
        origin: &DockerFile,
        cx: &StageContext,
    ) -> Result<FetchedSource, JobError>;
}

pub struct FetchedSource {
    pub context: SealedContext,
    /// Set for git sources.
    pub revision: Option<Revision>,
    /// Bytes received over the network.
    pub fetched_bytes: u64,
}

/// Writes a build context as an uncompressed tar stream.
pub trait ContextWriter: Send + Sync {
    /// Writes every entry below the context directory, relative to it, with `.dockerignore`
    /// applied and symlinks stored as symlinks; plus the build file under
    /// [`SealedContext::dockerfile`] when it lies outside the context. Blocking I/O: run it on a
    /// blocking thread. Returns the bytes written.
    fn write_tar(&self, out: &mut dyn std::io::Write) -> Result<u64, JobError>;
}

/// The only thing a builder accepts: a checked context and the build file's name inside it.
pub struct SealedContext {
    dockerfile: String,
    writer: Box<dyn ContextWriter>,
}

impl SealedContext {
    /// `dockerfile` is the build file's path inside the context stream (`Dockerfile`,
    /// `app-one/Dockerfile`, or a reserved name for a build file outside the context).
    pub fn new(dockerfile: impl Into<String>, writer: Box<dyn ContextWriter>) -> Self {
        SealedContext {
            dockerfile: dockerfile.into(),
            writer,
        }
    }

    pub fn dockerfile(&self) -> &str {
        &self.dockerfile
    }

    pub fn write_tar(&self, out: &mut dyn std::io::Write) -> Result<u64, JobError> {
        self.writer.write_tar(out)
    }
}

impl std::fmt::Debug for SealedContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedContext")
            .field("dockerfile", &self.dockerfile)
            .finish_non_exhaustive()
    }
}
