//! The job pipeline (ARCHITECTURE §1): one function, [`run_job`], takes a job through its
//! stages in order, so reading it top to bottom tells what happens to a job.
//!
//! ```text
//! resolve ─▶ fetch (+ seal) ─▶ build (+ export)      docker-file jobs
//! resolve ─▶ import (+ export)                        registry jobs
//! ```
//!
//! Where a technology streams one stage into the next (a registry import writes to the
//! destination as it reads; a fetcher seals straight from the fetched objects), the two stages
//! are one port call, and the pipeline reports the stage the call began in. Queue handling
//! (claims, heartbeats, results, settling) is the worker's; this module knows nothing of it.
//!
//! Node credentials a job uses (the destination registry's password, `registries.credentials`
//! handed to a build) join the job's masking set here, before a stage sends them anywhere.

pub mod attempt;
pub mod build_cache;
pub mod destination;

use std::sync::Arc;

use tokio::time::Instant;

use crate::context::frontend;
use crate::error::{JobError, Stage};
use crate::job::{BuildOptions, ImageInfo, Job, JobEvent, Origin, Revision, Timings};
use crate::ports::{
    BasicAuth, BuildRequest, Builder, CredentialResolver, Destination, Fetcher, ImportRequest,
    Importer, SealedContext, StageContext,
};
use crate::secret::Secret;

pub use build_cache::BuildCacheSettings;
pub use destination::DestinationSettings;

/// The adapters the stages run on, chosen by `app.rs` (real) or a test (fakes).
#[derive(Clone)]
pub struct Stages {
    pub fetcher: Arc<dyn Fetcher>,
    pub builder: Arc<dyn Builder>,
    pub resolver: Arc<dyn CredentialResolver>,
    pub importer: Arc<dyn Importer>,
    /// Node-level registry credentials for `FROM` lines (`registries.credentials`); a job's
    /// own credentials for the same host win.
    pub node_registry_auth: Vec<NodeRegistryAuth>,
    /// The node's own credentials (NATS, `registries.credentials`): masked in every job's text
    /// whether or not the job uses them.
    pub node_secrets: Vec<Secret>,
    /// Frontend images a build may name (`builder.allowed_frontends`, canonical).
    pub allowed_frontends: Vec<String>,
    /// Hosts reachable over plain HTTP (`registries.insecure`).
    pub insecure_registries: Vec<String>,
    pub destinations: DestinationSettings,
    /// The fleet's shared build cache (`[builder.cache]`), if configured.
    pub build_cache: Option<BuildCacheSettings>,
}

/// One of `registries.credentials`, its password read: offered to the builds of the sources
/// it names, for its host only.
#[derive(Debug, Clone)]
pub struct NodeRegistryAuth {
    pub host: String,
    pub auth: BasicAuth,
    /// `source_id`s or prefixes ending in `*`; `None`: every source.
    pub sources: Option<Vec<String>>,
}

/// What a successful job produced.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutput {
    pub image: ImageInfo,
    pub revision: Option<Revision>,
    pub timings: Timings,
}

/// Runs one attempt of `job` through its stages. Cancellation arrives through `cx.cancel`;
/// every stage observes it.
pub async fn run_job(job: &Job, stages: &Stages, cx: &StageContext) -> Result<JobOutput, JobError> {
    let started = Instant::now();
    let mut timings = Timings::default();

    for secret in &stages.node_secrets {
        cx.redactor.add(secret, None);
    }
    if let Some(auth) = stages.build_cache.as_ref().and_then(|c| c.auth()) {
        // The node's own, offered to every build's session: masked in every job's text.
        cx.redactor.add(&auth.password, Some(&auth.username));
    }
    enter(cx, Stage::Resolve)?;
    let destination = stages.destinations.resolve(job)?;
    if let Destination::Registry {
        auth: Some(auth), ..
    } = &destination
    {
        // The node's own password, not the job's: it must be masked in this job's text too.
        cx.redactor.add(&auth.password, Some(&auth.username));
    }

    let (image, revision) = match &job.origin {
        Origin::DockerFile(docker_file) => {
            enter(cx, Stage::Fetch)?;
            let t = Instant::now();
            let fetched = stages.fetcher.fetch(docker_file, cx).await?;
            timings.fetch = elapsed_ms(t);

            enter(cx, Stage::Build)?;
            let t = Instant::now();
            let options = job.build.clone().unwrap_or_default();
            let cache_host = stages.build_cache.as_ref().map(|c| c.host());
            let context = check_build_file(
                fetched.context,
                &options,
                &stages.allowed_frontends,
                cache_host,
            )
            .await?;
            let cache = build_cache(stages.build_cache.as_ref(), job, &options, cx);
            let registry_auth =
                build_registry_auth(&stages.node_registry_auth, &docker_file.credentials, job);
            // The node's `registries.credentials` go to this build's session: mask them too.
            for (_, auth) in &registry_auth {
                cx.redactor.add(&auth.password, Some(&auth.username));
            }
            let request = BuildRequest {
                context,
                options,
                registry_auth,
                destination,
                cache,
            };
            let image = stages.builder.build(request, cx).await?;
            timings.build = elapsed_ms(t);
            (image, fetched.revision)
        }
        origin => {
            let source = import_source(origin);
            let auth = stages.resolver.resolve(origin, false, cx).await?;

            enter(cx, Stage::Import)?;
            let t = Instant::now();
            let request = ImportRequest {
                origin,
                plain_http: plain_http(origin, &source, &stages.insecure_registries),
                source,
                auth,
                resolver: stages.resolver.as_ref(),
                destination,
            };
            let image = stages.importer.import(request, cx).await?;
            timings.import = elapsed_ms(t);
            (image, None)
        }
    };
    timings.total = elapsed_ms(started);
    Ok(JobOutput {
        image,
        revision,
        timings,
    })
}

/// Announces a stage, unless the job was cancelled in between.
fn enter(cx: &StageContext, stage: Stage) -> Result<(), JobError> {
    if cx.cancel.is_cancelled() {
        return Err(JobError::cancelled(stage));
    }
    cx.emit(JobEvent::Stage { stage });
    Ok(())
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

fn import_source(origin: &Origin) -> crate::reference::Reference {
    match origin {
        Origin::DockerHub(o) => o.target.clone(),
        Origin::DockerRegistry(o) => o.target.clone(),
        Origin::OciRegistry(o) => o.target.clone(),
        Origin::DockerFile(_) => unreachable!("docker-file jobs are built, not imported"),
    }
}

/// Plain HTTP to the source registry: when the job's url says `http://` or the host is
/// configured insecure.
fn plain_http(origin: &Origin, source: &crate::reference::Reference, insecure: &[String]) -> bool {
    use crate::reference::Scheme;
    let explicit = match origin {
        Origin::DockerRegistry(o) => o.registry.scheme == Some(Scheme::Http),
        Origin::OciRegistry(o) => o.registry.scheme == Some(Scheme::Http),
        _ => false,
    };
    explicit || insecure.iter().any(|h| h == source.registry())
}

/// Refuses a build whose build file or `BUILDKIT_SYNTAX` argument names a frontend the node
/// does not allow (a frontend is an image BuildKit would pull and run with the job's context),
/// or whose build file or arguments name the build cache registry `cache_host`
/// ([`build_cache::check_not_named`]). The build file is read from the sealed context, off the
/// async runtime.
async fn check_build_file(
    context: SealedContext,
    options: &BuildOptions,
    allowed: &[String],
    cache_host: Option<&str>,
) -> Result<SealedContext, JobError> {
    let (context, build_file) = tokio::task::spawn_blocking(move || {
        let build_file = context.read_build_file(frontend::MAX_BUILD_FILE_BYTES);
        (context, build_file)
    })
    .await
    .map_err(|e| {
        JobError::transient(
            Stage::Build,
            crate::error::ErrorCode::Internal,
            format!("reading the build file failed: {e}"),
        )
    })?;
    let build_file = build_file?;
    frontend::check(context.dockerfile(), &build_file, &options.args, allowed)?;
    if let Some(host) = cache_host {
        build_cache::check_not_named(host, context.dockerfile(), &build_file, &options.args)?;
    }
    Ok(context)
}

/// The shared build cache of `job`'s source, if the node has one; a source without one (its
/// id makes no repository name) builds without, which costs a warning, not the build.
fn build_cache(
    settings: Option<&BuildCacheSettings>,
    job: &Job,
    options: &BuildOptions,
    cx: &StageContext,
) -> Option<crate::ports::BuildCache> {
    match settings?.for_job(job, options) {
        Ok(cache) => Some(cache),
        Err(why) => {
            tracing::warn!(job.id = %job.id, reason = %why, "Building without the shared build cache.");
            cx.emit(JobEvent::Warning {
                code: crate::job::WARNING_BUILD_CACHE.to_owned(),
                message: why,
            });
            None
        }
    }
}

/// The credentials for a build's `FROM` lines: the job's, then the node's for other hosts,
/// each node login only where it is offered to the job's source.
fn build_registry_auth(
    node: &[NodeRegistryAuth],
    own: &[crate::job::RegistryCredential],
    job: &Job,
) -> Vec<(String, BasicAuth)> {
    let mut out: Vec<(String, BasicAuth)> = own
        .iter()
        .map(|c| {
            (
                c.url.clone(),
                BasicAuth {
                    username: c.username.clone(),
                    password: c.token.clone(),
                },
            )
        })
        .collect();
    for login in node {
        let offered = crate::config::source_scope_matches(login.sources.as_deref(), &job.source_id);
        if offered && !out.iter().any(|(h, _)| *h == login.host) {
            out.push((login.host.clone(), login.auth.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests;
