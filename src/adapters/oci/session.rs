//! The registries of one import as sessions: the source ([`Source`]: a mirror, anonymously, or
//! the registry itself with the job's credentials, refreshed once when they expire mid-import)
//! and the destination ([`Sink`]: the layout store or a registry with the operator's
//! credentials); opening them and fetching manifests from the source.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Mutex;
use url::Url;

use super::client::RegistryClient;
use super::retry::retrying;
use super::{manifest_error, RegistryImporter, Run, STAGE};
use crate::adapters::oci_layout::{OciLayoutStore, StoreLease};
use crate::error::{ErrorCode, JobError};
use crate::job::Origin;
use crate::manifest::{Algorithm, Digest, Manifest};
use crate::ports::{CredentialResolver, Destination, ImportRequest, StageContext};

/// The source side of one import: the endpoint chosen and how to refresh its credentials.
pub(super) struct Source<'a> {
    pub(super) client: RegistryClient,
    pub(super) repository: String,
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
pub(super) enum Sink {
    Layout {
        store: Arc<OciLayoutStore>,
        tag: String,
        source_id: String,
        /// Held for the whole import: a collection keeps what this import touches.
        _lease: StoreLease,
    },
    Registry {
        client: Box<RegistryClient>,
        repository: String,
        tag: String,
    },
}

impl RegistryImporter {
    /// Mirrors first (anonymously), then the registry; the first that serves the top manifest
    /// is used for the whole image.
    pub(super) async fn open_source<'a>(
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

    pub(super) async fn fetch_manifest(
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

    pub(super) async fn open_sink(
        &self,
        destination: &Destination,
        cx: &StageContext,
    ) -> Result<Sink, JobError> {
        match destination {
            Destination::OciLayout {
                path,
                tag,
                source_id,
            } => {
                let store = self.layout_store(path).await?;
                let lease = store.lease().map_err(|e| e.into_job_error(STAGE))?;
                Ok(Sink::Layout {
                    store,
                    tag: tag.clone(),
                    source_id: source_id.clone(),
                    _lease: lease,
                })
            }
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
    /// Runs a source operation, refreshing credentials once on an auth failure.
    pub(super) async fn with_source_auth<T, F, Fut>(&self, op: F) -> Result<T, JobError>
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
}
