//! The [`Fetcher`] for docker-file jobs: a git repository or a web-served tar.gz, fetched into
//! the job's workspace and sealed into a build context.
//!
//! The workspace (`cx.workspace`, made by [`crate::workspace::Workspace`]) must outlive the
//! returned [`SealedContext`]: the context stream is read from the fetched objects in it when
//! the builder asks. Cancellation (`cx.cancel`) ends a fetch with a `cancelled` error; the
//! caller, which knows whether it was a request, a timeout or a shutdown, reclassifies it.

use async_trait::async_trait;

use super::git::GitFetcher;
use super::tarball::TarballFetcher;
use crate::config::Config;
use crate::context::Limits;
use crate::egress::EgressPolicy;
use crate::error::{JobError, Stage};
use crate::job::{BuildSource, DockerFile};
use crate::ports::{FetchedSource, Fetcher, StageContext};
use crate::telemetry::metrics;

/// Fetches and seals docker-file sources. Build one at start-up and share it.
#[derive(Debug, Clone)]
pub struct SourceFetcher {
    git: GitFetcher,
    tarball: TarballFetcher,
}

impl SourceFetcher {
    /// From the worker's `[git]`, `[sources]` and `[egress]` configuration.
    pub fn new(config: &Config) -> Result<SourceFetcher, JobError> {
        let policy = EgressPolicy::from_config(&config.egress);
        Ok(SourceFetcher {
            git: GitFetcher::new(
                config.git.clone(),
                policy,
                config.sources.max_fetch_bytes,
                Limits::from_config(&config.sources),
            ),
            tarball: TarballFetcher::new(&config.sources, policy)?,
        })
    }
}

#[async_trait]
impl Fetcher for SourceFetcher {
    async fn fetch(
        &self,
        origin: &DockerFile,
        cx: &StageContext,
    ) -> Result<FetchedSource, JobError> {
        fetch_accounted(origin, cx, || self.fetch_source(origin, cx)).await
    }
}

impl SourceFetcher {
    /// Fetches and seals the job's git repository or tar.gz.
    async fn fetch_source(
        &self,
        origin: &DockerFile,
        cx: &StageContext,
    ) -> Result<FetchedSource, JobError> {
        // The pipeline announced the fetch stage; this adapter reports progress within it.
        match &origin.source {
            BuildSource::Repo(repo) => self
                .git
                .fetch(repo, &origin.context_dir, &origin.build_file, cx)
                .await
                .map(|s| FetchedSource {
                    context: s.context,
                    revision: Some(s.revision),
                    fetched_bytes: s.fetched_bytes,
                }),
            BuildSource::TargzUrl(url) => self
                .tarball
                .fetch(url, &origin.context_dir, &origin.build_file, cx)
                .await
                .map(|s| FetchedSource {
                    context: s.context,
                    revision: None,
                    fetched_bytes: s.fetched_bytes,
                }),
        }
    }
}

/// What every docker-file fetcher does around its own `fetch` (in-process or in the source
/// child): nothing starts once `cx.cancel` has fired, and the outcome is [`account`]ed.
pub(crate) async fn fetch_accounted<F, Fut>(
    origin: &DockerFile,
    cx: &StageContext,
    fetch: F,
) -> Result<FetchedSource, JobError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<FetchedSource, JobError>>,
{
    if cx.cancel.is_cancelled() {
        return Err(JobError::cancelled(Stage::Fetch));
    }
    let result = fetch().await;
    account(origin, result, cx)
}

/// What every docker-file fetcher does with its outcome (in-process or in the source child):
/// counts the bytes received by source kind, and masks the job's credentials in an error's
/// message, a second line of defence for a message that leaves the process.
pub(crate) fn account(
    origin: &DockerFile,
    result: Result<FetchedSource, JobError>,
    cx: &StageContext,
) -> Result<FetchedSource, JobError> {
    if let Ok(fetched) = &result {
        let kind = match origin.source {
            BuildSource::Repo(_) => "git",
            BuildSource::TargzUrl(_) => "tarball",
        };
        metrics()
            .fetched_bytes
            .with_label_values(&[kind])
            .inc_by(fetched.fetched_bytes);
    }
    result.map_err(|mut e| {
        e.message = cx.redactor.redact(&e.message);
        e
    })
}
