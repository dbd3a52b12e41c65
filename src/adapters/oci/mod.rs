//! Registry imports (ARCHITECTURE §8): [`RegistryImporter`] copies an image from a source
//! registry into the local OCI layout store or a destination registry.
//!
//! The journey of one import, top to bottom in [`RegistryImporter::run`]:
//! pick the source endpoint (configured mirrors first, anonymously, then the registry) → fetch
//! the top manifest (size-capped, digest-checked) → plan which images to keep (an index is
//! filtered by `registries.platforms`; one kept image out of several is copied alone, as
//! `docker pull` does) → copy every distinct blob, `max_parallel_blobs` at a time, skipping
//! blobs the destination has, mounting across repositories of the same registry, streaming each
//! from source to destination with digest and size verified before it is committed → write the
//! manifests (byte for byte to a registry; as OCI to the layout) → tag.
//!
//! The distribution API is spoken with reqwest directly ([`client`]), not through oci-client:
//! oci-client builds its own HTTP client, so the egress policy (a resolver that drops refused
//! addresses, redirect checks) could not apply to job-named registries; it drops `Retry-After`
//! and the HTTP status behind its errors, which the error classes need; and its pushes do not
//! offer streamed monolithic uploads with verification or cross-repository mounts under our
//! own auth. See the report of issue 6.
//!
//! What it must not do: hold a layer whole in memory, commit unverified content, send
//! credentials anywhere but the registry and its token realm (mirrors get none), or put server
//! text into a message without redaction.
//!
//! # Layout
//!
//! * this file — the importer and `RegistryImporter::run`, the journey of one import;
//! * `session` — the source and destination registries of an import, credentials refreshed
//!   once mid-import, manifest fetches;
//! * `plan` — which manifests and images to copy;
//! * `copy` — the blob and manifest transfer, with progress events;
//! * `verify` — the digest and size check of a blob streamed to a destination registry;
//! * `retry` — the retry loop around one registry request and its policy, [`RequestRetry`];
//! * [`client`] — the distribution API over reqwest; [`auth`] — challenges and token cache.

pub mod auth;
pub mod client;
mod copy;
mod plan;
mod retry;
mod session;
mod verify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use url::Url;

use self::session::{Sink, Source};
use super::oci_layout::{OciLayoutStore, OciLayoutStores};
use crate::config::{Platform, RegistriesConfig};
use crate::egress::EgressPolicy;
use crate::error::{ErrorCode, JobError, Stage};
use crate::job::ImageInfo;
use crate::manifest::{config_platform, ManifestError};
use crate::ports::{EventSink, ImportRequest, Importer, StageContext};
use crate::telemetry::metrics;

pub use self::retry::RequestRetry;

const STAGE: Stage = Stage::Import;

/// Settings of the importer, from `[registries]`.
#[derive(Debug, Clone)]
pub struct ImporterSettings {
    pub platforms: Vec<Platform>,
    pub mirrors: BTreeMap<String, Vec<Url>>,
    pub max_parallel_blobs: usize,
    pub max_manifest_bytes: usize,
    /// `registries.max_blob_bytes`.
    pub max_blob_bytes: u64,
    pub retry: RequestRetry,
}

impl ImporterSettings {
    pub fn from_config(config: &RegistriesConfig) -> ImporterSettings {
        ImporterSettings {
            platforms: config.platforms.clone(),
            mirrors: config.mirrors.clone(),
            max_parallel_blobs: config.max_parallel_blobs.max(1) as usize,
            max_manifest_bytes: config.max_manifest_bytes,
            max_blob_bytes: config.max_blob_bytes,
            retry: RequestRetry::default(),
        }
    }
}

/// The [`Importer`] for registry origins (docker-hub, docker-registry, oci-registry).
pub struct RegistryImporter {
    /// For job-named hosts: under the egress policy.
    source_http: reqwest::Client,
    /// For the operator's destination registry.
    destination_http: reqwest::Client,
    egress: EgressPolicy,
    settings: ImporterSettings,
    stores: OciLayoutStores,
}

/// The HTTP client settings of every registry request.
fn http_client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(120))
        .tcp_nodelay(true)
        .pool_max_idle_per_host(64)
}

/// An HTTP client for the operator's destination registry: no proxy, redirects as configured,
/// not under the egress policy (the operator named it).
pub fn destination_http_client() -> Result<reqwest::Client, reqwest::Error> {
    http_client_builder()
        .no_proxy()
        .redirect(crate::egress::configured_redirects())
        .build()
}

impl RegistryImporter {
    pub fn new(settings: ImporterSettings, egress: EgressPolicy) -> Result<Self, JobError> {
        let build_error = |e: reqwest::Error| {
            JobError::transient(
                STAGE,
                ErrorCode::Internal,
                format!("cannot build the HTTP client: {e}"),
            )
        };
        Ok(RegistryImporter {
            source_http: egress
                .http_client(http_client_builder())
                .build()
                .map_err(build_error)?,
            destination_http: destination_http_client().map_err(build_error)?,
            egress,
            settings,
            stores: OciLayoutStores::default(),
        })
    }

    /// The importer for a validated configuration.
    pub fn from_config(config: &crate::config::Config) -> Result<Self, JobError> {
        RegistryImporter::new(
            ImporterSettings::from_config(&config.registries),
            EgressPolicy::from_config(&config.egress),
        )
    }

    /// The store behind an `oci-layout` destination directory (opened once, shared by jobs).
    pub async fn layout_store(
        &self,
        path: &std::path::Path,
    ) -> Result<Arc<OciLayoutStore>, JobError> {
        self.stores
            .get(path)
            .await
            .map_err(|e| e.into_job_error(STAGE))
    }
}

#[async_trait]
impl Importer for RegistryImporter {
    async fn import(
        &self,
        request: ImportRequest<'_>,
        cx: &StageContext,
    ) -> Result<ImageInfo, JobError> {
        tokio::select! {
            // Dropping the copy aborts every request in flight and removes half-written blobs.
            _ = cx.cancel.cancelled() => Err(JobError::cancelled(STAGE)),
            result = self.run(request, cx) => result,
        }
    }
}

/// The shared state of one import's blob copies.
struct Run<'a> {
    importer: &'a RegistryImporter,
    source: Source<'a>,
    sink: Sink,
    cx: &'a StageContext,
    events: Arc<dyn EventSink>,
    /// Blob bytes received from the source in this import.
    transferred: Arc<AtomicU64>,
}

impl RegistryImporter {
    async fn run(
        &self,
        request: ImportRequest<'_>,
        cx: &StageContext,
    ) -> Result<ImageInfo, JobError> {
        let reference = request.source.clone();
        let (source, top) = self.open_source(&request, cx).await?;
        let sink = self.open_sink(&request.destination, cx).await?;
        let run = Run {
            importer: self,
            source,
            sink,
            cx,
            events: cx.events.clone(),
            transferred: Arc::new(AtomicU64::new(0)),
        };
        let plan = run.plan(top, &self.settings.platforms).await?;

        // Every distinct blob once; configs are kept in memory to read their platform.
        let mut seen = HashSet::new();
        let mut blobs = Vec::new();
        for (_, image) in &plan.images {
            let config = image.config.iter().map(|c| (c, true));
            for (descriptor, is_config) in config.chain(image.layers.iter().map(|l| (l, false))) {
                if seen.insert(descriptor.digest.clone()) {
                    blobs.push((descriptor.clone(), is_config));
                }
            }
        }
        // A declared size over the cap refuses the image before any blob moves (the transfer
        // itself stops at the declared size and checks the digest).
        let cap = self.settings.max_blob_bytes;
        if let Some((big, _)) = blobs.iter().find(|(d, _)| d.size > cap) {
            return Err(JobError::permanent(
                STAGE,
                ErrorCode::LimitExceeded,
                format!(
                    "{} declares a blob {} of {} bytes, over registries.max_blob_bytes ({cap})",
                    run.source.repository, big.digest, big.size
                ),
            ));
        }
        let blob_bytes: u64 = blobs.iter().map(|(d, _)| d.size).sum();
        let copied: Result<HashMap<String, Bytes>, JobError> = futures_util::stream::iter(blobs)
            .map(|(descriptor, is_config)| run.copy_blob(descriptor, is_config))
            .buffer_unordered(self.settings.max_parallel_blobs)
            .try_filter_map(|kept| async move { Ok(kept) })
            .try_collect()
            .await;
        // Counted whether or not the copy succeeded: the bytes crossed the network either way.
        metrics()
            .fetched_bytes
            .with_label_values(&["registry"])
            .inc_by(run.transferred.load(Ordering::Relaxed));
        let configs = copied?;

        let (stored, manifest_bytes) = run.write_manifests(&plan).await?;
        let platforms = match &plan.index {
            Some(_) => plan
                .images
                .iter()
                .filter_map(|(entry, _)| entry.platform.as_ref())
                .filter(|p| p.os != "unknown")
                .map(|p| p.display())
                .collect(),
            None => plan
                .images
                .iter()
                .filter_map(|(_, m)| m.config.as_ref())
                .filter_map(|c| configs.get(&c.digest))
                .filter_map(|bytes| config_platform(bytes))
                .map(|p| p.display())
                .collect(),
        };
        let source_digest = match &plan.index {
            Some(index) => index.digest.to_string(),
            None => plan
                .images
                .first()
                .map(|(_, m)| m.digest.to_string())
                .unwrap_or_default(),
        };
        tracing::info!(
            job.id = %cx.job_id,
            source = %reference,
            digest = %stored,
            transferred_bytes = run.transferred.load(Ordering::Relaxed),
            "Image imported."
        );
        Ok(ImageInfo {
            reference: request.destination.reference(),
            digest: stored.to_string(),
            source_digest: Some(source_digest),
            size_bytes: blob_bytes + manifest_bytes,
            platforms,
        })
    }
}

fn manifest_error(err: ManifestError, host: &str, repository: &str, target: &str) -> JobError {
    JobError::permanent(
        STAGE,
        ErrorCode::Unsupported,
        format!("{repository}:{target} on registry {host}: {err}"),
    )
}
