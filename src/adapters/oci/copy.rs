//! The transfer: every blob from the source to the destination (skipped when the destination
//! has it, mounted across repositories of one registry, otherwise streamed with its size and
//! digest verified before it is committed), then the manifests, children first, and the tag.
//! Byte progress of each blob goes out as events ([`Progress`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as StdMutex};

use bytes::Bytes;
use futures_util::StreamExt;

use super::client::{self, registry_request_error, RegistryClient, UploadStart};
use super::plan::Plan;
use super::retry::retrying;
use super::session::Sink;
use super::verify::{Verdict, Verified};
use super::{manifest_error, Run, STAGE};
use crate::adapters::oci_layout::{OciLayoutStore, StoreError};
use crate::error::{ErrorCode, JobError};
use crate::job::JobEvent;
use crate::manifest::{
    filtered_index, oci_media_type, to_oci_image, to_oci_index, Descriptor, Digest, Hasher,
    ManifestError, OCI_INDEX, OCI_MANIFEST,
};
use crate::ports::EventSink;
use crate::telemetry::metrics;

/// A progress event per blob at most every this many bytes (and at the end).
const PROGRESS_STEP: u64 = 8 * 1024 * 1024;
/// Image configs are read whole (they are JSON documents) to report platforms; larger ones are
/// streamed like layers and their platform is not reported.
const MAX_KEPT_CONFIG: u64 = 4 * 1024 * 1024;

impl Run<'_> {
    /// Copies one blob unless the destination has it. Returns the bytes of a kept config.
    pub(super) async fn copy_blob(
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
            let chunk = chunk.map_err(|e| registry_request_error(self.source.client.host(), e))?;
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
    pub(super) async fn write_manifests(&self, plan: &Plan) -> Result<(Digest, u64), JobError> {
        let policy = self.importer.settings.retry;
        match &self.sink {
            Sink::Layout {
                store,
                tag,
                source_id,
                ..
            } => {
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
                store.tag(&top, tag, source_id).await.map_err(store_err)?;
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
pub(super) struct Progress {
    events: Arc<dyn EventSink>,
    item: String,
    total: u64,
    done: u64,
    reported: u64,
}

impl Progress {
    pub(super) fn new(events: Arc<dyn EventSink>, digest: &Digest, total: u64) -> Progress {
        Progress {
            events,
            item: digest.to_string(),
            total,
            done: 0,
            reported: 0,
        }
    }

    pub(super) fn advance(&mut self, n: u64) {
        self.done += n;
        if self.done - self.reported >= PROGRESS_STEP {
            self.emit();
        }
    }

    pub(super) fn finish(&mut self) {
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
