//! Fetching a docker-file job's source and sealing it into a build context.

use async_trait::async_trait;

use super::StageContext;
use crate::error::{ErrorCode, JobError, Stage};
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

    /// The build file's content, read from the context stream (at most `max` bytes; a larger
    /// build file is `limit_exceeded`). Blocking: the stream is written on a scoped thread into
    /// a pipe and read until the build file; the writer stops when the pipe closes. In the
    /// worst case (a build file outside the context comes last) that is one extra pass over
    /// the context.
    pub fn read_build_file(&self, max: u64) -> Result<Vec<u8>, JobError> {
        let local = |what: &str, e: std::io::Error| {
            let (code, class) = crate::error::classify_io(&e);
            JobError::new(Stage::Build, code, format!("{what}: {e}")).with_class(class)
        };
        let (reader, mut pipe) = std::io::pipe().map_err(|e| local("opening a pipe", e))?;
        std::thread::scope(|scope| {
            let producer = scope.spawn(move || {
                let written = self.writer.write_tar(&mut pipe);
                drop(pipe);
                written
            });
            let found = find_entry(reader, &self.dockerfile, max);
            // The reader is gone: a writer still going fails on the closed pipe and returns.
            let produced = producer.join();
            match (found, produced) {
                (Ok(Some(content)), _) => Ok(content),
                (Err(e), _) if e.code == ErrorCode::LimitExceeded => Err(e),
                (_, Ok(Err(e))) => Err(e),
                (Err(e), _) => Err(e),
                (Ok(None), _) => Err(JobError::permanent(
                    Stage::Build,
                    ErrorCode::Internal,
                    format!(
                        "the build file {:?} is not in the context stream",
                        self.dockerfile
                    ),
                )),
            }
        })
    }
}

/// Reads the tar stream until the regular file `name`; its content, at most `max` bytes.
fn find_entry(
    reader: std::io::PipeReader,
    name: &str,
    max: u64,
) -> Result<Option<Vec<u8>>, JobError> {
    use std::io::Read;
    let broken = |e: std::io::Error| {
        JobError::transient(
            Stage::Build,
            ErrorCode::Internal,
            format!("reading the context stream: {e}"),
        )
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(broken)? {
        let mut entry = entry.map_err(broken)?;
        let path = entry.path().map_err(broken)?;
        if path.to_str() != Some(name) {
            continue;
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(JobError::permanent(
                Stage::Build,
                ErrorCode::UnsafeSource,
                format!("the build file {name:?} is not a regular file"),
            ));
        }
        if entry.size() > max {
            return Err(JobError::permanent(
                Stage::Build,
                ErrorCode::LimitExceeded,
                format!("the build file {name:?} is larger than {max} bytes"),
            ));
        }
        let mut content = Vec::new();
        entry
            .by_ref()
            .take(max)
            .read_to_end(&mut content)
            .map_err(broken)?;
        return Ok(Some(content));
    }
    Ok(None)
}

impl std::fmt::Debug for SealedContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedContext")
            .field("dockerfile", &self.dockerfile)
            .finish_non_exhaustive()
    }
}
