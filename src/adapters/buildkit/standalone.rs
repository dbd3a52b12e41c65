//! The `buildkitd` backend on a standalone buildkitd (`builder.buildkitd_addr` = `unix://…` or
//! `tcp://…`, plain HTTP/2): the image goes from BuildKit straight to the destination, with no
//! Docker Engine store in between. A `registry` destination through the `image` exporter
//! (`push=true`; the destination's credentials through the session's Auth), an `oci-layout`
//! destination through the `oci` exporter, whose archive BuildKit sends back through the
//! session (FileSend) into the job's workspace and which is then stored in the layout.
//!
//! The build itself (session, Solve, Status, cancellation) is [`grpc::solve`]'s.
//!
//! Not exercised by any test on this project's machine (Debian 12 ships no buildkitd): only the
//! archive ingest and the exporter attributes have unit tests. Must not: write or follow a path
//! named in the archive; log or put in an error any credential.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint, Uri};

use super::export::local_io;
use super::gate::{CredentialSet, Gate};
use super::grpc::{self, Exporter};
use super::{answer_within, cache, on_build_thread, redacted, BuildInput};
use crate::adapters::oci_layout::{OciLayoutStore, OciLayoutStores};
use crate::config::DaemonAddr;
use crate::error::{error_chain, ErrorCode, JobError, Stage};
use crate::job::{ImageInfo, JobEvent};
use crate::manifest::{Descriptor, Digest};
use crate::ports::{BuildRequest, Builder, CachePrune, Destination, StageContext};
use crate::workspace::random_hex;

/// Cap on the archive's `index.json`.
const MAX_INDEX_BYTES: u64 = 1024 * 1024;

/// Builds on a standalone buildkitd. Cheap to share; each build opens its own connection.
#[derive(Debug, Clone)]
pub struct StandaloneBuilder {
    addr: DaemonAddr,
    stores: Arc<OciLayoutStores>,
}

impl StandaloneBuilder {
    pub fn new(addr: DaemonAddr) -> StandaloneBuilder {
        StandaloneBuilder {
            addr,
            stores: Arc::new(OciLayoutStores::default()),
        }
    }
}

#[async_trait]
impl Builder for StandaloneBuilder {
    async fn ready(&self) -> Result<(), String> {
        let addr = &self.addr;
        let probe = async {
            let channel = daemon_channel(addr).await.map_err(|e| e.message)?;
            grpc::workers_answer(channel, &format!("buildkitd at {addr}")).await
        };
        answer_within(addr, probe).await
    }

    /// buildkitd's cache, through `DiskUsage` and `Prune` (see the private `cache` module).
    async fn prune_cache(&self, keep_bytes: u64) -> Result<CachePrune, String> {
        let who = format!("buildkitd at {}", self.addr);
        let prune = async {
            let channel = daemon_channel(&self.addr).await.map_err(|e| e.message)?;
            grpc::prune_cache(channel, keep_bytes, &who).await
        };
        cache::recorded(&who, keep_bytes, prune).await
    }

    async fn build(&self, request: BuildRequest, cx: &StageContext) -> Result<ImageInfo, JobError> {
        let _pass = Gate::for_address(&self.addr.to_string())
            .enter(
                CredentialSet::of(&request.registry_auth, &request.options),
                &cx.cancel,
            )
            .await?;
        let (addr, stores) = (self.addr.clone(), self.stores.clone());
        on_build_thread(cx, move |cx| async move {
            build_to_destination(addr, stores, request, &cx)
                .await
                .map_err(|e| redacted(e, &cx))
        })
        .await
    }
}

async fn build_to_destination(
    addr: DaemonAddr,
    stores: Arc<OciLayoutStores>,
    request: BuildRequest,
    cx: &StageContext,
) -> Result<ImageInfo, JobError> {
    let channel = daemon_channel(&addr).await?;
    let BuildRequest {
        context,
        options,
        mut registry_auth,
        destination,
    } = request;
    let platforms: Vec<String> = options.platform.iter().cloned().collect();
    let reference = destination.reference();
    match &destination {
        Destination::Registry { registry, auth, .. } => {
            if let Some(auth) = auth {
                // First wins: the destination's own credentials are the ones that may push.
                registry_auth.insert(0, (registry.clone(), auth.clone()));
            }
            let exporter = Exporter {
                name: "image",
                attrs: push_attrs(&destination),
                file: None,
            };
            let input = BuildInput {
                context,
                options: &options,
                registry_auth: &registry_auth,
            };
            let response = grpc::solve(channel, input, exporter, cx).await?;
            let digest = response
                .get("containerimage.digest")
                .cloned()
                .ok_or_else(|| {
                    JobError::transient(
                        Stage::Export,
                        ErrorCode::Internal,
                        "buildkitd pushed the image but reported no digest",
                    )
                })?;
            Ok(ImageInfo {
                reference,
                digest,
                source_digest: None,
                // BuildKit does not report what it pushed.
                size_bytes: 0,
                platforms,
            })
        }
        Destination::OciLayout {
            path,
            tag,
            source_id,
        } => {
            let archive = cx
                .workspace
                .join(format!("export-{}.oci.tar", random_hex(8)));
            let exporter = Exporter {
                name: "oci",
                attrs: HashMap::new(),
                file: Some(archive.clone()),
            };
            let input = BuildInput {
                context,
                options: &options,
                registry_auth: &registry_auth,
            };
            grpc::solve(channel, input, exporter, cx).await?;
            if cx.cancel.is_cancelled() {
                return Err(JobError::cancelled(Stage::Build));
            }
            cx.emit(JobEvent::Stage {
                stage: Stage::Export,
            });
            let store = stores
                .get(path)
                .await
                .map_err(|e| e.into_job_error(Stage::Export))?;
            // Held until the tag is written: a collection keeps what this export touches.
            let _lease = store.lease().map_err(|e| e.into_job_error(Stage::Export))?;
            let stored = ingest_oci_archive(&store, &archive, &cx.workspace).await;
            let _ = tokio::fs::remove_file(&archive).await;
            let (descriptor, size_bytes) = stored?;
            store
                .tag(&descriptor, tag, source_id)
                .await
                .map_err(|e| e.into_job_error(Stage::Export))?;
            Ok(ImageInfo {
                reference,
                digest: descriptor.digest,
                source_digest: None,
                size_bytes,
                platforms,
            })
        }
    }
}

/// The `image` exporter's attributes for a push to a registry destination.
fn push_attrs(destination: &Destination) -> HashMap<String, String> {
    let mut attrs = HashMap::from([
        ("name".to_owned(), destination.reference()),
        ("push".to_owned(), "true".to_owned()),
    ]);
    if let Destination::Registry {
        plain_http: true, ..
    } = destination
    {
        attrs.insert("registry.insecure".to_owned(), "true".to_owned());
    }
    attrs
}

/// A gRPC channel straight to buildkitd (plain HTTP/2; no TLS).
async fn daemon_channel(addr: &DaemonAddr) -> Result<Channel, JobError> {
    let unavailable = |e: tonic::transport::Error| {
        JobError::transient(
            Stage::Build,
            ErrorCode::Unavailable,
            format!("buildkitd at {addr} is unavailable: {}", error_chain(&e)),
        )
    };
    match addr {
        DaemonAddr::Unix(path) => {
            let path = path.clone();
            Endpoint::from_static("http://buildkitd")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map(TokioIo::new)
                    }
                }))
                .await
        }
        DaemonAddr::Tcp { host, port } => {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            Endpoint::from_shared(format!("http://{host}:{port}"))
                .map_err(unavailable)?
                .connect()
                .await
        }
    }
    .map_err(unavailable)
}

#[derive(Deserialize)]
struct ArchiveIndex {
    manifests: Vec<Descriptor>,
}

/// Stores the blobs of an OCI archive (the `oci` exporter's tar) in `store`, each verified
/// against its name; returns the archive's image (the first of its index) and the bytes stored.
async fn ingest_oci_archive(
    store: &OciLayoutStore,
    archive: &Path,
    workspace: &Path,
) -> Result<(Descriptor, u64), JobError> {
    let dir = workspace.join(format!("oci-{}", random_hex(8)));
    let (archive, unpack_dir) = (archive.to_path_buf(), dir.clone());
    let unpacked = tokio::task::spawn_blocking(move || unpack_blobs(&archive, &unpack_dir))
        .await
        .map_err(|e| archive_malformed(format!("the unpacking thread failed: {e}")));
    let stored = async {
        let (index, blobs) = unpacked??;
        let mut total = 0;
        for (digest, size, path) in &blobs {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| local_io(path, &e))?;
            store
                .put_blob(file, digest, *size)
                .await
                .map_err(|e| e.into_job_error(Stage::Export))?;
            total += size;
        }
        let index: ArchiveIndex = serde_json::from_slice(&index)
            .map_err(|e| archive_malformed(format!("index.json: {e}")))?;
        let image = index
            .manifests
            .into_iter()
            .next()
            .ok_or_else(|| archive_malformed("index.json names no image".to_owned()))?;
        if !blobs
            .iter()
            .any(|(digest, _, _)| digest.as_str() == image.digest)
        {
            return Err(archive_malformed(format!(
                "the image {} is not in the archive",
                image.digest
            )));
        }
        Ok((image, total))
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    stored
}

/// The archive's `index.json` and its `blobs/sha256/*` files, copied into `dir` under their
/// (validated) digests. Other entries, links included, are ignored.
type Unpacked = (Vec<u8>, Vec<(Digest, u64, PathBuf)>);

fn unpack_blobs(archive: &Path, dir: &Path) -> Result<Unpacked, JobError> {
    std::fs::create_dir_all(dir).map_err(|e| local_io(dir, &e))?;
    let file = std::fs::File::open(archive).map_err(|e| local_io(archive, &e))?;
    let mut tar = tar::Archive::new(file);
    let bad = |e: std::io::Error| archive_malformed(e.to_string());
    let mut index = None;
    let mut blobs = Vec::new();
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let name = name.trim_start_matches("./");
        if name == "index.json" {
            let mut bytes = Vec::new();
            entry
                .by_ref()
                .take(MAX_INDEX_BYTES)
                .read_to_end(&mut bytes)
                .map_err(bad)?;
            index = Some(bytes);
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            let digest = Digest::parse(&format!("sha256:{hex}"))
                .map_err(|_| archive_malformed(format!("unexpected blob name {name:?}")))?;
            // A validated hex digest: a plain file name.
            let path = dir.join(hex);
            let mut out = std::fs::File::create(&path).map_err(|e| local_io(&path, &e))?;
            let size = std::io::copy(&mut entry, &mut out).map_err(|e| local_io(&path, &e))?;
            blobs.push((digest, size, path));
        }
    }
    let index = index.ok_or_else(|| archive_malformed("no index.json".to_owned()))?;
    Ok((index, blobs))
}

fn archive_malformed(message: String) -> JobError {
    JobError::transient(
        Stage::Export,
        ErrorCode::Internal,
        format!("unexpected OCI archive from buildkitd: {message}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::OCI_MANIFEST;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, body) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *body).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn blob_name(bytes: &[u8]) -> String {
        let digest = Digest::sha256_of(bytes);
        format!("blobs/sha256/{}", &digest.as_str()["sha256:".len()..])
    }

    /// Ingests an archive of `files` into a new store; the store's directory and the result.
    async fn ingest(
        files: &[(&str, &[u8])],
    ) -> (
        tempfile::TempDir,
        OciLayoutStore,
        Result<(Descriptor, u64), JobError>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = OciLayoutStore::open(dir.path().join("store"))
            .await
            .unwrap();
        let archive = dir.path().join("export.tar");
        std::fs::write(&archive, tar_of(files)).unwrap();
        let result = ingest_oci_archive(&store, &archive, dir.path()).await;
        (dir, store, result)
    }

    #[tokio::test]
    async fn an_oci_archive_is_stored_blob_by_blob_and_its_image_is_returned() {
        let layer = b"layer bytes".as_slice();
        let manifest = br#"{"schemaVersion":2}"#.as_slice();
        let manifest_digest = Digest::sha256_of(manifest);
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{}}}]}}"#,
            manifest_digest.as_str(),
            manifest.len()
        );
        let (_dir, store, result) = ingest(&[
            ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
            (&blob_name(layer), layer),
            (&blob_name(manifest), manifest),
            ("index.json", index.as_bytes()),
        ])
        .await;
        let (image, size) = result.unwrap();
        assert_eq!(image.digest, manifest_digest.as_str());
        assert_eq!(size, (layer.len() + manifest.len()) as u64);
        assert!(
            store
                .has_blob(&Digest::sha256_of(layer), layer.len() as u64)
                .await
        );
    }

    #[tokio::test]
    async fn a_blob_that_does_not_match_its_name_is_refused() {
        let wrong = blob_name(b"something else");
        let files: [(&str, &[u8]); 2] =
            [(&wrong, b"layer"), ("index.json", br#"{"manifests":[]}"#)];
        let (_dir, _store, result) = ingest(&files).await;
        let e = result.unwrap_err();
        // Refused at the blob, before the index is read.
        assert!(!e.message.contains("index.json"), "{e}");
    }

    #[tokio::test]
    async fn a_blob_name_that_is_not_a_digest_is_refused() {
        let files: [(&str, &[u8]); 2] = [("blobs/sha256/not-hex", b"x"), ("index.json", b"{}")];
        let (_dir, _store, result) = ingest(&files).await;
        let e = result.unwrap_err();
        assert!(e.message.contains("unexpected blob name"), "{e}");
    }

    #[test]
    fn pushes_name_the_destination_and_plain_http_registries_are_insecure() {
        let destination = Destination::Registry {
            registry: "127.0.0.1:5000".into(),
            plain_http: true,
            repository: "team/app".into(),
            tag: "v1".into(),
            auth: None,
        };
        let attrs = push_attrs(&destination);
        assert_eq!(attrs["name"], "127.0.0.1:5000/team/app:v1");
        assert_eq!(attrs["push"], "true");
        assert_eq!(attrs["registry.insecure"], "true");
    }
}
