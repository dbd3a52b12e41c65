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

pub mod auth;
pub mod client;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use tokio::sync::Mutex;
use url::Url;

use self::client::{request_error, RegistryClient, UploadStart};
use super::oci_layout::{OciLayoutStore, OciLayoutStores, StoreError};
use crate::config::{Platform, RegistriesConfig};
use crate::egress::EgressPolicy;
use crate::error::{ErrorClass, ErrorCode, JobError, Stage};
use crate::job::{ImageInfo, JobEvent, Origin};
use crate::manifest::{
    config_platform, filtered_index, oci_media_type, select_platforms, to_oci_image, to_oci_index,
    Algorithm, Descriptor, Digest, Hasher, Kind, Manifest, ManifestError, OCI_INDEX, OCI_MANIFEST,
};
use crate::ports::{
    CredentialResolver, Destination, EventSink, ImportRequest, Importer, StageContext,
};
use crate::telemetry::metrics;

const STAGE: Stage = Stage::Import;
/// A progress event per blob at most every this many bytes (and at the end).
const PROGRESS_STEP: u64 = 8 * 1024 * 1024;
/// Image configs are read whole (they are JSON documents) to report platforms; larger ones are
/// streamed like layers and their platform is not reported.
const MAX_KEPT_CONFIG: u64 = 4 * 1024 * 1024;

/// How often and how long a transient failure is retried inside one import, before it is
/// handed to the queue's retry (which waits minutes).
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries per operation, the first included.
    pub attempts: u32,
    /// Delay before the first retry; doubles each time.
    pub base_delay: Duration,
    /// A `Retry-After` longer than this is left to the queue.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(500),
            max_wait: Duration::from_secs(30),
        }
    }
}

/// Settings of the importer, from `[registries]`.
#[derive(Debug, Clone)]
pub struct ImporterSettings {
    pub platforms: Vec<Platform>,
    pub mirrors: BTreeMap<String, Vec<Url>>,
    pub max_parallel_blobs: usize,
    pub max_manifest_bytes: usize,
    /// `registries.max_blob_bytes`.
    pub max_blob_bytes: u64,
    pub retry: RetryPolicy,
}

impl ImporterSettings {
    pub fn from_config(config: &RegistriesConfig) -> ImporterSettings {
        ImporterSettings {
            platforms: config.platforms.clone(),
            mirrors: config.mirrors.clone(),
            max_parallel_blobs: config.max_parallel_blobs.max(1) as usize,
            max_manifest_bytes: config.max_manifest_bytes,
            max_blob_bytes: config.max_blob_bytes,
            retry: RetryPolicy::default(),
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

impl RegistryImporter {
    pub fn new(settings: ImporterSettings, egress: EgressPolicy) -> Result<Self, JobError> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(15))
                .read_timeout(Duration::from_secs(120))
                .tcp_nodelay(true)
                .pool_max_idle_per_host(64)
        };
        let build_error = |e: reqwest::Error| {
            JobError::transient(
                STAGE,
                ErrorCode::Internal,
                format!("cannot build the HTTP client: {e}"),
            )
        };
        Ok(RegistryImporter {
            source_http: egress.http_client(builder()).build().map_err(build_error)?,
            destination_http: builder()
                .no_proxy()
                .redirect(crate::egress::configured_redirects())
                .build()
                .map_err(build_error)?,
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

/// The source side of one import: the endpoint chosen and how to refresh its credentials.
struct Source<'a> {
    client: RegistryClient,
    repository: String,
    /// Set when the source is the registry itself with credentials from the resolver (mirrors
    /// are anonymous and never refreshed).
    refresh: Option<Refresh<'a>>,
}

struct Refresh<'a> {
    origin: &'a Origin,
    resolver: &'a dyn CredentialResolver,
    /// Counts refreshes; one per import.
    generation: Mutex<u32>,
}

/// Where blobs and manifests go.
enum Sink {
    Layout {
        store: Arc<OciLayoutStore>,
        tag: String,
    },
    Registry {
        client: Box<RegistryClient>,
        repository: String,
        tag: String,
    },
}

/// What to copy: the images, and the index that lists them when one is kept.
struct Plan {
    index: Option<Manifest>,
    /// Index entries (or the top manifest's own descriptor) with the image manifests.
    images: Vec<(Descriptor, Manifest)>,
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

    /// Mirrors first (anonymously), then the registry; the first that serves the top manifest
    /// is used for the whole image.
    async fn open_source<'a>(
        &self,
        request: &ImportRequest<'a>,
        cx: &StageContext,
    ) -> Result<(Source<'a>, Manifest), JobError> {
        let reference = &request.source;
        let repository = reference.repository().to_owned();
        let target = reference
            .digest()
            .or(reference.tag())
            .unwrap_or(crate::reference::DEFAULT_TAG)
            .to_owned();
        let expected = reference
            .digest()
            .map(Digest::parse)
            .transpose()
            .map_err(|e| JobError::permanent(STAGE, ErrorCode::InvalidJob, e.to_string()))?;

        for mirror in self
            .settings
            .mirrors
            .get(reference.registry())
            .into_iter()
            .flatten()
        {
            let client = match RegistryClient::new(
                self.source_http.clone(),
                mirror.clone(),
                None,
                Some(self.egress),
                cx.redactor.clone(),
            ) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(job.id = %cx.job_id, mirror = %mirror, error = %e, "Mirror refused; trying the next.");
                    continue;
                }
            };
            let source = Source {
                client,
                repository: repository.clone(),
                refresh: None,
            };
            match self
                .fetch_manifest(&source, &target, expected.as_ref())
                .await
            {
                Ok(top) => return Ok((source, top)),
                Err(e) => {
                    tracing::warn!(job.id = %cx.job_id, mirror = %source.client.host(), error = %e, "Mirror failed; trying the next.");
                }
            }
        }

        let scheme = if request.plain_http { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{}/", reference.api_host())).map_err(|e| {
            JobError::permanent(
                STAGE,
                ErrorCode::InvalidJob,
                format!("registry {} is not a valid host: {e}", reference.api_host()),
            )
        })?;
        let has_auth = request.auth.is_some();
        let client = RegistryClient::new(
            self.source_http.clone(),
            base,
            request.auth.clone(),
            Some(self.egress),
            cx.redactor.clone(),
        )?;
        let source = Source {
            client,
            repository,
            refresh: has_auth.then(|| Refresh {
                origin: request.origin,
                resolver: request.resolver,
                generation: Mutex::new(0),
            }),
        };
        let top = self
            .fetch_manifest_refreshing(&source, &target, expected.as_ref(), cx)
            .await?;
        Ok((source, top))
    }

    async fn fetch_manifest_refreshing(
        &self,
        source: &Source<'_>,
        target: &str,
        expected: Option<&Digest>,
        cx: &StageContext,
    ) -> Result<Manifest, JobError> {
        match self.fetch_manifest(source, target, expected).await {
            Err(e)
                if e.code == ErrorCode::AuthFailed
                    && refresh_credentials(source, 0, cx).await? =>
            {
                self.fetch_manifest(source, target, expected).await
            }
            other => other,
        }
    }

    async fn fetch_manifest(
        &self,
        source: &Source<'_>,
        target: &str,
        expected: Option<&Digest>,
    ) -> Result<Manifest, JobError> {
        let cap = self.settings.max_manifest_bytes;
        let (bytes, content_type, header_digest) =
            retrying(self.settings.retry, "manifest", || {
                source.client.get_manifest(&source.repository, target, cap)
            })
            .await?;
        let algorithm = expected.map_or(Algorithm::Sha256, Digest::algorithm);
        let manifest = Manifest::parse(bytes, content_type.as_deref(), algorithm)
            .map_err(|e| manifest_error(e, source.client.host(), &source.repository, target))?;
        let mismatch = |claimed: &Digest| {
            JobError::permanent(
                STAGE,
                ErrorCode::DigestMismatch,
                format!(
                    "registry {} served manifest {}:{target} whose content has digest {}, not {claimed}",
                    source.client.host(),
                    source.repository,
                    manifest.digest
                ),
            )
        };
        if let Some(expected) = expected {
            if &manifest.digest != expected {
                return Err(mismatch(expected));
            }
        }
        if let Some(claimed) = header_digest.as_deref().and_then(|h| Digest::parse(h).ok()) {
            if claimed.algorithm() == manifest.digest.algorithm() && claimed != manifest.digest {
                return Err(mismatch(&claimed));
            }
        }
        Ok(manifest)
    }

    async fn open_sink(
        &self,
        destination: &Destination,
        cx: &StageContext,
    ) -> Result<Sink, JobError> {
        match destination {
            Destination::OciLayout { path, tag } => Ok(Sink::Layout {
                store: self.layout_store(path).await?,
                tag: tag.clone(),
            }),
            Destination::Registry {
                registry,
                plain_http,
                repository,
                tag,
                auth,
            } => {
                let scheme = if *plain_http { "http" } else { "https" };
                let base = Url::parse(&format!("{scheme}://{registry}/")).map_err(|e| {
                    JobError::permanent(
                        STAGE,
                        ErrorCode::InvalidJob,
                        format!("destination registry {registry} is not a valid host: {e}"),
                    )
                })?;
                Ok(Sink::Registry {
                    client: Box::new(RegistryClient::new(
                        self.destination_http.clone(),
                        base,
                        auth.clone(),
                        None,
                        cx.redactor.clone(),
                    )?),
                    repository: repository.clone(),
                    tag: tag.clone(),
                })
            }
        }
    }
}

/// Refreshes the source's credentials once per import after a 401 (an ECR token expiring in
/// the middle of a long import). `seen` is the generation the failed call ran under: when
/// another task already refreshed since, the caller just tries again. Returns whether to retry.
async fn refresh_credentials(
    source: &Source<'_>,
    seen: u32,
    cx: &StageContext,
) -> Result<bool, JobError> {
    let Some(refresh) = &source.refresh else {
        return Ok(false);
    };
    let mut generation = refresh.generation.lock().await;
    if *generation != seen {
        return Ok(true);
    }
    if *generation >= 1 {
        return Ok(false);
    }
    tracing::info!(job.id = %cx.job_id, registry = %source.client.host(), "Credentials refused mid-import; resolving them afresh once.");
    let fresh = refresh.resolver.resolve(refresh.origin, true, cx).await?;
    source.client.set_credentials(fresh).await;
    *generation += 1;
    Ok(true)
}

impl Run<'_> {
    async fn plan(&self, top: Manifest, wanted: &[Platform]) -> Result<Plan, JobError> {
        if top.kind == Kind::Image {
            return Ok(Plan {
                index: None,
                images: vec![(top.descriptor(), top)],
            });
        }
        let kept: Vec<Descriptor> = select_platforms(&top, wanted)
            .into_iter()
            .cloned()
            .collect();
        let images_kept: Vec<&Descriptor> = kept
            .iter()
            .filter(|d| d.platform.as_ref().is_some_and(|p| p.os != "unknown"))
            .collect();
        if images_kept.is_empty() {
            let offered: Vec<String> = top
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| p.display())
                .collect();
            let wanted: Vec<String> = wanted.iter().map(ToString::to_string).collect();
            return Err(JobError::permanent(
                STAGE,
                ErrorCode::NotFound,
                format!(
                    "the image index offers no wanted platform: wanted {}, offered {}",
                    wanted.join(", "),
                    offered.join(", ")
                ),
            ));
        }
        // One image out of several: copy it alone, as `docker pull` does; its digest is the
        // source's. Every entry kept: the index is copied whole, byte for byte.
        let single = images_kept.len() == 1 && kept.len() < top.manifests.len();
        let entries: Vec<Descriptor> = if single {
            images_kept.into_iter().cloned().collect()
        } else {
            kept
        };
        let mut images = Vec::with_capacity(entries.len());
        for entry in entries {
            let digest = entry.checked_digest().map_err(|e| {
                manifest_error(
                    e,
                    self.source.client.host(),
                    &self.source.repository,
                    "index",
                )
            })?;
            let child = self.fetch_child(&digest).await?;
            if child.kind != Kind::Image {
                return Err(JobError::permanent(
                    STAGE,
                    ErrorCode::Unsupported,
                    format!(
                        "index entry {digest} is itself an index; nested indexes are not imported"
                    ),
                ));
            }
            images.push((entry, child));
        }
        Ok(Plan {
            index: (!single).then_some(top),
            images,
        })
    }

    async fn fetch_child(&self, digest: &Digest) -> Result<Manifest, JobError> {
        self.with_source_auth(|| {
            self.importer
                .fetch_manifest(&self.source, digest.as_str(), Some(digest))
        })
        .await
    }

    /// Runs a source operation, refreshing credentials once on an auth failure.
    async fn with_source_auth<T, F, Fut>(&self, op: F) -> Result<T, JobError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, JobError>>,
    {
        let seen = match &self.source.refresh {
            Some(r) => *r.generation.lock().await,
            None => 0,
        };
        match op().await {
            Err(e) if e.code == ErrorCode::AuthFailed => {
                if refresh_credentials(&self.source, seen, self.cx).await? {
                    op().await
                } else {
                    Err(e)
                }
            }
            other => other,
        }
    }

    /// Copies one blob unless the destination has it. Returns the bytes of a kept config.
    async fn copy_blob(
        &self,
        descriptor: Descriptor,
        keep: bool,
    ) -> Result<Option<(String, Bytes)>, JobError> {
        let digest = descriptor.checked_digest().map_err(|e| {
            manifest_error(
                e,
                self.source.client.host(),
                &self.source.repository,
                "manifest",
            )
        })?;
        let size = descriptor.size;
        let keep = keep && size <= MAX_KEPT_CONFIG;
        let policy = self.importer.settings.retry;
        let kept = match &self.sink {
            Sink::Layout { store, .. } => {
                if store.has_blob(&digest, size).await {
                    metrics().blobs_skipped.inc();
                    return Ok(if keep {
                        store
                            .read_blob(&digest)
                            .await
                            .map_err(|e| e.into_job_error(STAGE))?
                            .map(|b| (descriptor.digest.clone(), Bytes::from(b)))
                    } else {
                        None
                    });
                }
                retrying(policy, "blob", || {
                    self.copy_to_layout(store, &digest, size, keep)
                })
                .await?
            }
            Sink::Registry {
                client, repository, ..
            } => {
                let present = retrying(policy, "blob check", || {
                    client.has_blob(repository, &digest, true)
                })
                .await?;
                if present {
                    metrics().blobs_skipped.inc();
                    if keep {
                        retrying(policy, "config", || self.read_source_blob(&digest, size)).await?
                    } else {
                        None
                    }
                } else {
                    retrying(policy, "blob", || {
                        self.copy_to_registry(client, repository, &digest, size, keep)
                    })
                    .await?
                }
            }
        };
        Ok(kept.map(|b| (descriptor.digest.clone(), b)))
    }

    async fn copy_to_layout(
        &self,
        store: &OciLayoutStore,
        digest: &Digest,
        size: u64,
        keep: bool,
    ) -> Result<Option<Bytes>, JobError> {
        let response = self
            .with_source_auth(|| self.source.client.get_blob(&self.source.repository, digest))
            .await?;
        let mut writer = store
            .blob_writer(digest, size)
            .await
            .map_err(|e| e.into_job_error(STAGE))?;
        let mut progress = Progress::new(self.events.clone(), digest, size);
        let mut kept = keep.then(Vec::new);
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| request_error(self.source.client.host(), e))?;
            if let Some(k) = &mut kept {
                k.extend_from_slice(&chunk);
            }
            let n = chunk.len() as u64;
            writer
                .write(chunk)
                .await
                .map_err(|e| blob_error(e, self.source.client.host()))?;
            progress.advance(n);
            self.transferred.fetch_add(n, Ordering::Relaxed);
        }
        writer
            .commit()
            .await
            .map_err(|e| blob_error(e, self.source.client.host()))?;
        progress.finish();
        Ok(kept.map(Bytes::from))
    }

    async fn copy_to_registry(
        &self,
        client: &RegistryClient,
        repository: &str,
        digest: &Digest,
        size: u64,
        keep: bool,
    ) -> Result<Option<Bytes>, JobError> {
        // A mount needs both repositories on one registry, reached the same way.
        let mount_from = (client.host() == self.source.client.host()
            && repository != self.source.repository)
            .then_some(self.source.repository.as_str());
        let location = match client.start_upload(repository, digest, mount_from).await? {
            UploadStart::Mounted => {
                // The destination registry had it, in another repository: nothing transferred.
                metrics().blobs_skipped.inc();
                return if keep {
                    self.read_source_blob(digest, size).await
                } else {
                    Ok(None)
                };
            }
            UploadStart::Location(location) => location,
        };
        let response = self
            .with_source_auth(|| self.source.client.get_blob(&self.source.repository, digest))
            .await?;
        let verdict = Arc::new(StdMutex::new(Verdict::Pending));
        let kept = keep.then(|| Arc::new(StdMutex::new(Vec::new())));
        let stream = Verified {
            inner: Box::pin(response.bytes_stream()),
            hasher: Some(Hasher::new(digest.algorithm())),
            seen: 0,
            size,
            digest: digest.clone(),
            progress: Progress::new(self.events.clone(), digest, size),
            verdict: verdict.clone(),
            kept: kept.clone(),
            transferred: self.transferred.clone(),
        };
        let result = client
            .put_upload(
                repository,
                location,
                digest,
                size,
                reqwest::Body::wrap_stream(stream),
            )
            .await;
        let verdict = verdict
            .lock()
            .map(|v| v.clone())
            .unwrap_or(Verdict::Pending);
        match verdict {
            Verdict::Mismatch(message) => {
                return Err(JobError::permanent(
                    STAGE,
                    ErrorCode::DigestMismatch,
                    message,
                ))
            }
            Verdict::SourceFailed(message) if result.is_err() => {
                return Err(JobError::transient(STAGE, ErrorCode::Unavailable, message))
            }
            _ => {}
        }
        result?;
        Ok(kept.and_then(|k| k.lock().ok().map(|v| Bytes::from(v.clone()))))
    }

    async fn read_source_blob(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<Option<Bytes>, JobError> {
        let response = self
            .with_source_auth(|| self.source.client.get_blob(&self.source.repository, digest))
            .await?;
        let bytes = client::read_capped(response, size as usize, self.source.client.host()).await?;
        let mut hasher = Hasher::new(digest.algorithm());
        hasher.update(&bytes);
        if &hasher.finish() != digest {
            return Err(JobError::permanent(
                STAGE,
                ErrorCode::DigestMismatch,
                format!(
                    "registry {} served blob {digest} with other content",
                    self.source.client.host()
                ),
            ));
        }
        Ok(Some(Bytes::from(bytes)))
    }

    /// Writes the manifests, children first, and tags the top. Returns the stored top digest
    /// and the bytes of the manifests written.
    async fn write_manifests(&self, plan: &Plan) -> Result<(Digest, u64), JobError> {
        let policy = self.importer.settings.retry;
        match &self.sink {
            Sink::Layout { store, tag } => {
                let store_err = |e: StoreError| e.into_job_error(STAGE);
                let convert = |e: ManifestError| {
                    JobError::permanent(STAGE, ErrorCode::Unsupported, e.to_string())
                };
                let mut written = 0u64;
                let mut entries = Vec::with_capacity(plan.images.len());
                for (entry, image) in &plan.images {
                    let bytes = to_oci_image(image).map_err(convert)?;
                    written += bytes.len() as u64;
                    let stored = store
                        .put_manifest(OCI_MANIFEST, &bytes)
                        .await
                        .map_err(store_err)?;
                    let mut entry = entry.clone();
                    entry.media_type = oci_media_type(&entry.media_type).to_owned();
                    if entry.media_type.is_empty() {
                        entry.media_type = OCI_MANIFEST.to_owned();
                    }
                    entry.digest = stored.digest.clone();
                    entry.size = stored.size;
                    entries.push((entry, stored));
                }
                let top = match &plan.index {
                    Some(index) => {
                        let list: Vec<Descriptor> =
                            entries.iter().map(|(e, _)| e.clone()).collect();
                        let bytes = to_oci_index(index, &list).map_err(convert)?;
                        written += bytes.len() as u64;
                        store
                            .put_manifest(OCI_INDEX, &bytes)
                            .await
                            .map_err(store_err)?
                    }
                    None => entries
                        .into_iter()
                        .next()
                        .map(|(_, stored)| stored)
                        .ok_or_else(|| {
                            JobError::permanent(STAGE, ErrorCode::NotFound, "no image to store")
                        })?,
                };
                store.tag(&top, tag).await.map_err(store_err)?;
                let digest = top.checked_digest().map_err(convert)?;
                Ok((digest, written))
            }
            Sink::Registry {
                client,
                repository,
                tag,
            } => {
                let mut written = 0u64;
                match &plan.index {
                    Some(index) => {
                        for (_, image) in &plan.images {
                            written += image.bytes.len() as u64;
                            retrying(policy, "manifest push", || {
                                client.put_manifest(
                                    repository,
                                    image.digest.as_str(),
                                    &image.media_type,
                                    &image.bytes,
                                )
                            })
                            .await?;
                        }
                        let entries: Vec<Descriptor> =
                            plan.images.iter().map(|(e, _)| e.clone()).collect();
                        let bytes = filtered_index(index, &entries).map_err(|e| {
                            JobError::permanent(STAGE, ErrorCode::Unsupported, e.to_string())
                        })?;
                        written += bytes.len() as u64;
                        retrying(policy, "manifest push", || {
                            client.put_manifest(repository, tag, &index.media_type, &bytes)
                        })
                        .await?;
                        Ok((Digest::sha256_of(&bytes), written))
                    }
                    None => {
                        let (_, image) = plan.images.first().ok_or_else(|| {
                            JobError::permanent(STAGE, ErrorCode::NotFound, "no image to push")
                        })?;
                        written += image.bytes.len() as u64;
                        retrying(policy, "manifest push", || {
                            client.put_manifest(repository, tag, &image.media_type, &image.bytes)
                        })
                        .await?;
                        Ok((image.digest.clone(), written))
                    }
                }
            }
        }
    }
}

/// Retries transient failures of `op` with exponential delays, waiting at least what a
/// `Retry-After` asked for; a wait longer than the policy allows is left to the queue.
async fn retrying<T, F, Fut>(policy: RetryPolicy, what: &str, op: F) -> Result<T, JobError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, JobError>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(e) if e.class == ErrorClass::Transient && attempt < policy.attempts => {
                let backoff = policy.base_delay * 2u32.saturating_pow(attempt - 1);
                let delay = match e.retry_after {
                    Some(after) if after > policy.max_wait => return Err(e),
                    Some(after) => after.max(backoff.min(policy.max_wait)),
                    None => backoff,
                };
                tracing::warn!(attempt, delay_ms = delay.as_millis() as u64, error = %e, "Registry {what} failed; retrying.");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn manifest_error(err: ManifestError, host: &str, repository: &str, target: &str) -> JobError {
    JobError::permanent(
        STAGE,
        ErrorCode::Unsupported,
        format!("{repository}:{target} on registry {host}: {err}"),
    )
}

fn blob_error(err: StoreError, host: &str) -> JobError {
    match err {
        StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. } => JobError::permanent(
            STAGE,
            ErrorCode::DigestMismatch,
            format!("registry {host} served a blob that fails verification: {err}"),
        ),
        other => other.into_job_error(STAGE),
    }
}

/// Byte progress of one blob, as events.
struct Progress {
    events: Arc<dyn EventSink>,
    item: String,
    total: u64,
    done: u64,
    reported: u64,
}

impl Progress {
    fn new(events: Arc<dyn EventSink>, digest: &Digest, total: u64) -> Progress {
        Progress {
            events,
            item: digest.to_string(),
            total,
            done: 0,
            reported: 0,
        }
    }

    fn advance(&mut self, n: u64) {
        self.done += n;
        if self.done - self.reported >= PROGRESS_STEP {
            self.emit();
        }
    }

    fn finish(&mut self) {
        if self.done != self.reported || self.done == 0 {
            self.emit();
        }
    }

    fn emit(&mut self) {
        self.reported = self.done;
        self.events.emit(JobEvent::Progress {
            stage: STAGE,
            item: self.item.clone(),
            done_bytes: self.done,
            total_bytes: Some(self.total),
        });
    }
}

#[derive(Debug, Clone)]
enum Verdict {
    Pending,
    Verified,
    Mismatch(String),
    SourceFailed(String),
}

/// A source body on its way to a destination registry, hashed and counted as it passes. It
/// ends with an error instead of its last byte when the content does not match, so the upload
/// is aborted and the destination commits nothing.
struct Verified {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    hasher: Option<Hasher>,
    seen: u64,
    size: u64,
    digest: Digest,
    progress: Progress,
    verdict: Arc<StdMutex<Verdict>>,
    kept: Option<Arc<StdMutex<Vec<u8>>>>,
    transferred: Arc<AtomicU64>,
}

impl Verified {
    /// Checks size and digest once, when the last byte has passed (or the source ended early).
    fn verify(&mut self) -> Result<(), String> {
        let Some(hasher) = self.hasher.take() else {
            return Ok(());
        };
        let actual = hasher.finish();
        if self.seen != self.size || actual != self.digest {
            let message = format!(
                "the source served blob {} with other content ({} of {} bytes, digest {actual}); nothing was committed",
                self.digest, self.seen, self.size
            );
            self.settle(Verdict::Mismatch(message.clone()));
            return Err(message);
        }
        self.settle(Verdict::Verified);
        self.progress.finish();
        Ok(())
    }

    fn settle(&self, verdict: Verdict) {
        if let Ok(mut v) = self.verdict.lock() {
            *v = verdict;
        }
    }
}

impl Stream for Verified {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                this.seen += chunk.len() as u64;
                if this.seen > this.size {
                    let message = format!(
                        "the source sent more than the {} bytes of blob {}",
                        this.size, this.digest
                    );
                    this.settle(Verdict::Mismatch(message.clone()));
                    return Poll::Ready(Some(Err(std::io::Error::other(message))));
                }
                if let Some(h) = &mut this.hasher {
                    h.update(&chunk);
                }
                if let Some(kept) = &this.kept {
                    if let Ok(mut k) = kept.lock() {
                        k.extend_from_slice(&chunk);
                    }
                }
                this.transferred
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                this.progress.advance(chunk.len() as u64);
                // Decide at the last byte: with a Content-Length body, the HTTP client may
                // never ask for the end of the stream.
                if this.seen == this.size {
                    if let Err(message) = this.verify() {
                        return Poll::Ready(Some(Err(std::io::Error::other(message))));
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                let message = format!(
                    "reading blob {} from the source failed: {e}",
                    this.digest.short()
                );
                this.settle(Verdict::SourceFailed(message.clone()));
                Poll::Ready(Some(Err(std::io::Error::other(message))))
            }
            Poll::Ready(None) => match this.verify() {
                Ok(()) => Poll::Ready(None),
                Err(message) => Poll::Ready(Some(Err(std::io::Error::other(message)))),
            },
        }
    }
}
