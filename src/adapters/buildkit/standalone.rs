//! The `buildkitd` backend on a standalone buildkitd (`builder.buildkitd_addr` = `unix://…` or
//! `tcp://…`, plain HTTP/2): the image goes from BuildKit straight to the destination, with no
//! Docker Engine store in between. A `registry` destination through the `image` exporter
//! (`push=true`; the destination's credentials through the session's Auth), an `oci-layout`
//! destination through the `oci` exporter, whose archive BuildKit sends back through the
//! session (FileSend) into the job's workspace and which is then stored in the layout.
//!
//! The build itself (session, Solve, Status, cancellation) is [`grpc::solve`]'s.
//!
//! BuildKit reports only the manifest's digest; the result's size (manifest, config and layers)
//! and platform (the config's) are read from the image as stored: the archive's manifest and
//! config, or the pushed ones, read back from the registry.
//!
//! Tested against BuildKit v0.11.6 (`tests/integration/builds.rs`, `standalone_buildkitd_*`,
//! with `FACTORYD_TEST_BUILDKITD`). Must not: write or follow a path named in the archive; log
//! or put in an error any credential.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint, Uri};

use super::export::local_io;
use super::fleet_cache::{self, CacheKind, CachePlan};
use super::gate::{CredentialSet, Gate};
use super::grpc::{self, Exporter, Solved};
use super::{answer_within, cache, on_build_thread, redacted, BuildInput};
use crate::adapters::oci::client::{read_capped, RegistryClient};
use crate::adapters::oci_layout::{OciLayoutStore, OciLayoutStores};
use crate::config::DaemonAddr;
use crate::error::{error_chain, ErrorCode, JobError, Stage};
use crate::job::{ImageInfo, JobEvent};
use crate::manifest::{config_platform, Algorithm, Descriptor, Digest, Hasher, Kind, Manifest};
use crate::ports::{BasicAuth, BuildRequest, Builder, CachePrune, Destination, StageContext};
use crate::workspace::random_hex;

/// Cap on the archive's `index.json`.
const MAX_INDEX_BYTES: u64 = 1024 * 1024;

/// Caps on the image manifest and config read for the result (BuildKit writes a few KiB).
const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

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
        cache,
    } = request;
    let plan = cache.map(|c| CachePlan::new(c, CacheKind::Registry));
    let reference = destination.reference();
    match &destination {
        Destination::Registry {
            registry,
            plain_http,
            repository,
            auth,
            ..
        } => {
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
                cache: plan.as_ref(),
            };
            let solved = grpc::solve(channel, input, exporter, cx).await?;
            report_cache(plan.as_ref(), &solved, cx);
            let digest = solved
                .exporter_response
                .get("containerimage.digest")
                .cloned()
                .ok_or_else(|| {
                    JobError::transient(
                        Stage::Export,
                        ErrorCode::Internal,
                        "buildkitd pushed the image but reported no digest",
                    )
                })?;
            let pushed = PushedImage {
                registry,
                plain_http: *plain_http,
                repository,
                auth: auth.as_ref(),
                digest: &digest,
            };
            let facts = pushed.read_back(cx).await?;
            Ok(ImageInfo {
                reference,
                digest,
                source_digest: None,
                size_bytes: facts.size_bytes,
                platforms: facts.platforms,
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
            // Uncompressed layers, as the engine backends store them (from `docker save`): the
            // store is local, and gzip of incompressible layers cost the export more than
            // the build (a 52 MB context: 2.0× `docker build` + `skopeo copy`).
            let exporter = Exporter {
                name: "oci",
                attrs: HashMap::from([("compression".to_owned(), "uncompressed".to_owned())]),
                file: Some(archive.clone()),
            };
            let input = BuildInput {
                context,
                options: &options,
                registry_auth: &registry_auth,
                cache: plan.as_ref(),
            };
            let solved = grpc::solve(channel, input, exporter, cx).await?;
            report_cache(plan.as_ref(), &solved, cx);
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
            let (descriptor, facts) = stored?;
            store
                .tag(&descriptor, tag, source_id)
                .await
                .map_err(|e| e.into_job_error(Stage::Export))?;
            Ok(ImageInfo {
                reference,
                digest: descriptor.digest,
                source_digest: None,
                size_bytes: facts.size_bytes,
                platforms: facts.platforms,
            })
        }
    }
}

/// What became of the shared cache in a build BuildKit finished: the registry cache export
/// ran in the solve (`ignore-error`, so a failed one did not fail it).
fn report_cache(plan: Option<&CachePlan>, solved: &Solved, cx: &StageContext) {
    if let Some(plan) = plan {
        fleet_cache::report(plan, &solved.cache, &solved.cache.export, cx);
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

/// What a result says of an image besides its digest.
#[derive(Debug, PartialEq)]
struct ImageFacts {
    /// The manifest, the config and the layers, as stored (layers compressed as exported).
    size_bytes: u64,
    /// The platform the config declares; none when it declares none.
    platforms: Vec<String>,
}

impl ImageFacts {
    fn of(manifest: &Manifest, config: &[u8]) -> ImageFacts {
        let config_size = manifest.config.as_ref().map_or(0, |c| c.size);
        let layers: u64 = manifest.layers.iter().map(|l| l.size).sum();
        ImageFacts {
            size_bytes: manifest.bytes.len() as u64 + config_size + layers,
            platforms: config_platform(config)
                .map(|p| p.display())
                .into_iter()
                .collect(),
        }
    }
}

/// `bytes` as the image manifest `digest` names: a single image (a build for one platform
/// exports no index), whose bytes have that digest.
fn image_manifest(
    bytes: Vec<u8>,
    media_type: Option<&str>,
    digest: &str,
) -> Result<Manifest, String> {
    let manifest = Manifest::parse(bytes, media_type, Algorithm::Sha256)
        .map_err(|e| format!("the image {digest}: {e}"))?;
    if manifest.digest.as_str() != digest {
        return Err(format!(
            "the image {digest} read back has the digest {}",
            manifest.digest
        ));
    }
    if manifest.kind != Kind::Image {
        return Err(format!("the image {digest} is an index, not one image"));
    }
    Ok(manifest)
}

/// The config digest of an image manifest (one [`image_manifest`] accepted).
fn config_digest(manifest: &Manifest) -> Result<Digest, String> {
    manifest
        .config
        .as_ref()
        .ok_or_else(|| "an image manifest without config".to_owned())?
        .checked_digest()
        .map_err(|e| e.to_string())
}

/// An image BuildKit pushed to the destination registry.
struct PushedImage<'a> {
    registry: &'a str,
    plain_http: bool,
    repository: &'a str,
    auth: Option<&'a BasicAuth>,
    digest: &'a str,
}

impl PushedImage<'_> {
    /// Its manifest and config, read back from the registry with the destination's
    /// credentials, as BuildKit reached it (see [`plain_http_for_buildkit`]).
    async fn read_back(&self, cx: &StageContext) -> Result<ImageFacts, JobError> {
        let scheme = if plain_http_for_buildkit(self.registry, self.plain_http) {
            "http"
        } else {
            "https"
        };
        let not_read = |why: String| {
            JobError::transient(
                Stage::Export,
                ErrorCode::Internal,
                format!(
                    "buildkitd pushed {}@{}, but reading it back failed: {why}",
                    self.repository, self.digest
                ),
            )
        };
        let base = url::Url::parse(&format!("{scheme}://{}/", self.registry))
            .map_err(|e| not_read(format!("the registry is not a valid host: {e}")))?;
        // A client of this build's own: each build runs on a runtime that ends with it, and
        // pooled connections must not outlive that.
        let http = crate::adapters::oci::destination_http_client()
            .map_err(|e| not_read(format!("cannot build the HTTP client: {e}")))?;
        let client = RegistryClient::new(http, base, self.auth.cloned(), None, cx.redactor.clone())
            .map_err(in_export)?;
        let (bytes, media_type, _) = client
            .get_manifest(self.repository, self.digest, MAX_MANIFEST_BYTES as usize)
            .await
            .map_err(in_export)?;
        let manifest =
            image_manifest(bytes, media_type.as_deref(), self.digest).map_err(not_read)?;
        let config_digest = config_digest(&manifest).map_err(not_read)?;
        let response = client
            .get_blob(self.repository, &config_digest)
            .await
            .map_err(in_export)?;
        let config = read_capped(response, MAX_CONFIG_BYTES as usize, client.host())
            .await
            .map_err(in_export)?;
        if digest_of(&config, &config_digest) != config_digest {
            return Err(not_read(format!(
                "its config does not match {config_digest}"
            )));
        }
        Ok(ImageFacts::of(&manifest, &config))
    }
}

/// Whether BuildKit reaches `registry` over plain HTTP: when the destination is configured
/// so (then it is pushed with `registry.insecure`), and for a loopback registry, which
/// BuildKit's resolver speaks plain HTTP to by default (containerd's `MatchLocalhost`).
fn plain_http_for_buildkit(registry: &str, plain_http: bool) -> bool {
    if plain_http {
        return true;
    }
    let Ok(url) = url::Url::parse(&format!("http://{registry}/")) else {
        return false;
    };
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    }
}

/// The digest of `bytes` with the algorithm of `named`.
fn digest_of(bytes: &[u8], named: &Digest) -> Digest {
    let mut hasher = Hasher::new(named.algorithm());
    hasher.update(bytes);
    hasher.finish()
}

/// A registry client's error, which names the import stage, as this export's.
fn in_export(mut e: JobError) -> JobError {
    e.stage = Stage::Export;
    e
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
/// against its name; returns the archive's image (the first of its index) and what its
/// manifest and config tell.
async fn ingest_oci_archive(
    store: &OciLayoutStore,
    archive: &Path,
    workspace: &Path,
) -> Result<(Descriptor, ImageFacts), JobError> {
    let dir = workspace.join(format!("oci-{}", random_hex(8)));
    let (archive, unpack_dir) = (archive.to_path_buf(), dir.clone());
    let unpacked = tokio::task::spawn_blocking(move || unpack_blobs(&archive, &unpack_dir))
        .await
        .map_err(|e| archive_malformed(format!("the unpacking thread failed: {e}")));
    let stored = async {
        let (index, blobs) = unpacked??;
        for (digest, size, path) in &blobs {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| local_io(path, &e))?;
            store
                .put_blob(file, digest, *size)
                .await
                .map_err(|e| e.into_job_error(Stage::Export))?;
        }
        let index: ArchiveIndex = serde_json::from_slice(&index)
            .map_err(|e| archive_malformed(format!("index.json: {e}")))?;
        let image = index
            .manifests
            .into_iter()
            .next()
            .ok_or_else(|| archive_malformed("index.json names no image".to_owned()))?;
        // Stored, so each blob matched its name.
        let blob = |digest: &str| {
            blobs
                .iter()
                .find(|(d, _, _)| d.as_str() == digest)
                .map(|(_, _, path)| path.clone())
                .ok_or_else(|| {
                    archive_malformed(format!("the blob {digest} is not in the archive"))
                })
        };
        let manifest_bytes = read_small(&blob(&image.digest)?, MAX_MANIFEST_BYTES).await?;
        let media_type = Some(image.media_type.as_str()).filter(|m| !m.is_empty());
        let manifest =
            image_manifest(manifest_bytes, media_type, &image.digest).map_err(archive_malformed)?;
        let config_digest = config_digest(&manifest).map_err(archive_malformed)?;
        let config = read_small(&blob(config_digest.as_str())?, MAX_CONFIG_BYTES).await?;
        Ok((image, ImageFacts::of(&manifest, &config)))
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    stored
}

/// The file at `path`, refused when it is larger than `cap`.
async fn read_small(path: &Path, cap: u64) -> Result<Vec<u8>, JobError> {
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| local_io(path, &e))?
        .len();
    if size > cap {
        return Err(archive_malformed(format!(
            "a manifest or config of {size} bytes; at most {cap} are read"
        )));
    }
    tokio::fs::read(path).await.map_err(|e| local_io(path, &e))
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
    use crate::manifest::{OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST};

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
        Result<(Descriptor, ImageFacts), JobError>,
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

    fn descriptor_json(media_type: &str, bytes: &[u8]) -> String {
        format!(
            r#"{{"mediaType":"{media_type}","digest":"{}","size":{}}}"#,
            Digest::sha256_of(bytes),
            bytes.len()
        )
    }

    const CONFIG: &[u8] =
        br#"{"architecture":"arm64","os":"linux","variant":"v8","rootfs":{"type":"layers"}}"#;
    const LAYER: &[u8] = b"layer bytes";

    /// An image manifest over [`CONFIG`] and [`LAYER`].
    fn manifest() -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":[{}]}}"#,
            descriptor_json(OCI_CONFIG, CONFIG),
            descriptor_json(OCI_LAYER_GZIP, LAYER)
        )
        .into_bytes()
    }

    /// An `index.json` naming `top` (of `media_type`).
    fn index_of(media_type: &str, top: &[u8]) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"manifests":[{}]}}"#,
            descriptor_json(media_type, top)
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn an_oci_archive_is_stored_blob_by_blob_and_its_image_is_returned() {
        let manifest = manifest();
        let index = index_of(OCI_MANIFEST, &manifest);
        let (_dir, store, result) = ingest(&[
            ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
            (&blob_name(LAYER), LAYER),
            (&blob_name(CONFIG), CONFIG),
            (&blob_name(&manifest), &manifest),
            ("index.json", &index),
        ])
        .await;
        let (image, facts) = result.unwrap();
        assert_eq!(image.digest, Digest::sha256_of(&manifest).as_str());
        assert!(
            store
                .has_blob(&Digest::sha256_of(LAYER), LAYER.len() as u64)
                .await
        );
        assert_eq!(
            facts,
            ImageFacts {
                size_bytes: (manifest.len() + CONFIG.len() + LAYER.len()) as u64,
                platforms: vec!["linux/arm64/v8".to_owned()],
            }
        );
    }

    /// Regression: the result of a build exported by a standalone buildkitd said
    /// `platforms: []` (and, pushed, `size_bytes: 0`); both come from the image's manifest and
    /// config now, whichever way the manifest reached us.
    #[test]
    fn facts_are_the_manifest_config_and_layers_and_the_configs_platform() {
        let bytes = manifest();
        let digest = Digest::sha256_of(&bytes).to_string();
        let parsed = image_manifest(bytes.clone(), None, &digest).unwrap();
        assert_eq!(config_digest(&parsed).unwrap(), Digest::sha256_of(CONFIG));
        assert_eq!(
            ImageFacts::of(&parsed, CONFIG),
            ImageFacts {
                size_bytes: (bytes.len() + CONFIG.len() + LAYER.len()) as u64,
                platforms: vec!["linux/arm64/v8".to_owned()],
            }
        );
        // A config without a platform: none reported, never an invented one.
        assert_eq!(
            ImageFacts::of(&parsed, b"{}").platforms,
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_manifest_read_back_must_be_the_image_buildkit_named() {
        let bytes = manifest();
        let other = Digest::sha256_of(b"another manifest").to_string();
        let why = image_manifest(bytes, None, &other).unwrap_err();
        assert!(why.contains("has the digest"), "{why}");
        let index = index_of(OCI_MANIFEST, &manifest());
        let digest = Digest::sha256_of(&index).to_string();
        let why = image_manifest(index, Some(OCI_INDEX), &digest).unwrap_err();
        assert!(why.contains("is an index"), "{why}");
    }

    #[tokio::test]
    async fn an_archive_whose_image_has_no_config_blob_is_refused() {
        let manifest = manifest();
        let index = index_of(OCI_MANIFEST, &manifest);
        let (_dir, _store, result) = ingest(&[
            (&blob_name(LAYER), LAYER),
            (&blob_name(&manifest), &manifest),
            ("index.json", &index),
        ])
        .await;
        let e = result.unwrap_err();
        assert!(
            e.message.contains(&format!(
                "{} is not in the archive",
                Digest::sha256_of(CONFIG)
            )),
            "{e}"
        );
    }

    #[test]
    fn loopback_registries_are_read_back_over_plain_http_as_buildkit_pushes_to_them() {
        for registry in [
            "127.0.0.1:5000",
            "localhost:5000",
            "[::1]:5000",
            "127.0.0.1",
        ] {
            assert!(plain_http_for_buildkit(registry, false), "{registry}");
        }
        for registry in ["registry.example:5000", "10.0.0.1:5000", "registry.example"] {
            assert!(!plain_http_for_buildkit(registry, false), "{registry}");
            assert!(plain_http_for_buildkit(registry, true), "{registry}");
        }
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
