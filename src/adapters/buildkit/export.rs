//! Exporting a built image from the engine's image store to the job's destination.
//!
//! The engine's embedded BuildKit (20.10) has no `oci` or `image` exporter (ARCHITECTURE §10),
//! so the image is built into the engine's store and leaves it through the engine:
//!
//! * `registry`: tagged `registry/repository:tag` and pushed by the engine with the
//!   destination's credentials (`X-Registry-Auth`); the result digest is the pushed manifest's,
//!   as the engine reports it.
//! * `oci-layout`: `docker save` streamed (the image export API), its layers hashed into
//!   temporary files in the job's workspace (the save format names layers by v1 ids, so a
//!   layer's digest is known only once it is read), then stored in the [`OciLayoutStore`] with
//!   an OCI manifest over the same config and uncompressed layer blobs.
//!
//! Must not: hold a layer in memory; leave the pushed tag in the engine.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bollard::auth::DockerCredentials;
use bollard::query_parameters::{PushImageOptions, RemoveImageOptions, TagImageOptions};
use bollard::Docker;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::adapters::oci_layout::{OciLayoutStore, OciLayoutStores};
use crate::error::{ErrorCode, JobError, Stage};
use crate::job::ImageInfo;
use crate::manifest::{
    Algorithm, Descriptor, Digest, Hasher, OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST,
};
use crate::ports::{Destination, StageContext};
use crate::workspace::random_hex;

/// Cap on the small JSON files of a saved image (its manifest list and the image config).
const MAX_JSON_BYTES: u64 = 16 * 1024 * 1024;

/// Saved-image chunks in flight between the HTTP stream and the tar reader.
const SAVE_CHUNKS_IN_FLIGHT: usize = 8;

pub async fn export(
    docker: &Docker,
    stores: &OciLayoutStores,
    image: &str,
    destination: &Destination,
    cx: &StageContext,
) -> Result<ImageInfo, JobError> {
    let (inspected_size, platforms) = inspect(docker, image).await?;
    match destination {
        Destination::Registry {
            registry,
            repository,
            tag,
            auth,
            ..
        } => {
            let credentials = auth.as_ref().map(|a| DockerCredentials {
                username: Some(a.username.clone()),
                password: Some(a.password.expose().to_owned()),
                serveraddress: Some(registry.clone()),
                ..DockerCredentials::default()
            });
            let target = format!("{registry}/{repository}");
            let pushed = push(docker, image, &target, tag, credentials, cx).await;
            untag(docker, &format!("{target}:{tag}")).await;
            Ok(ImageInfo {
                reference: destination.reference(),
                digest: pushed?,
                source_digest: None,
                // The engine does not report the compressed sizes it pushed.
                size_bytes: inspected_size,
                platforms,
            })
        }
        Destination::OciLayout {
            path,
            tag,
            source_id,
        } => {
            let store = stores
                .get(path)
                .await
                .map_err(|e| e.into_job_error(Stage::Export))?;
            // Held until the tag is written: a collection keeps what this export touches.
            let _lease = store.lease().map_err(|e| e.into_job_error(Stage::Export))?;
            let (digest, size_bytes) =
                save_to_layout(docker, &store, image, (tag, source_id), cx).await?;
            Ok(ImageInfo {
                reference: destination.reference(),
                digest,
                source_digest: None,
                size_bytes,
                platforms,
            })
        }
    }
}

/// The image's size in the engine and its platform.
async fn inspect(docker: &Docker, image: &str) -> Result<(u64, Vec<String>), JobError> {
    let info = docker.inspect_image(image).await.map_err(|e| {
        JobError::transient(
            Stage::Export,
            ErrorCode::Unavailable,
            format!("cannot inspect the built image: {e}"),
        )
    })?;
    let mut platform = format!(
        "{}/{}",
        info.os.unwrap_or_default(),
        info.architecture.unwrap_or_default()
    );
    if let Some(variant) = info.variant.filter(|v| !v.is_empty()) {
        platform = format!("{platform}/{variant}");
    }
    Ok((info.size.unwrap_or(0).max(0) as u64, vec![platform]))
}

/// Tags `image` as `target:tag` and has the engine push it with `credentials`; the pushed
/// manifest's digest.
pub(super) async fn push(
    docker: &Docker,
    image: &str,
    target: &str,
    tag: &str,
    credentials: Option<DockerCredentials>,
    cx: &StageContext,
) -> Result<String, JobError> {
    let options = TagImageOptions {
        repo: Some(target.to_owned()),
        tag: Some(tag.to_owned()),
    };
    docker
        .tag_image(image, Some(options))
        .await
        .map_err(|e| push_error(&e.to_string(), true))?;
    let options = PushImageOptions {
        tag: Some(tag.to_owned()),
        ..PushImageOptions::default()
    };
    let mut stream = docker.push_image(target, Some(options), credentials);
    let mut digest = None;
    loop {
        let item = tokio::select! {
            biased;
            _ = cx.cancel.cancelled() => return Err(JobError::cancelled(Stage::Export)),
            item = stream.next() => item,
        };
        match item {
            None => break,
            Some(Ok(info)) => {
                // The last status reads "TAG: digest: sha256:… size: N".
                if let Some(found) = info.status.as_deref().and_then(pushed_digest) {
                    digest = Some(found);
                }
            }
            Some(Err(bollard::errors::Error::DockerStreamError { error })) => {
                return Err(push_error(&error, false))
            }
            Some(Err(e)) => return Err(push_error(&e.to_string(), true)),
        }
    }
    digest.ok_or_else(|| {
        JobError::transient(
            Stage::Export,
            ErrorCode::Internal,
            format!("the engine pushed {target}:{tag} without reporting its digest"),
        )
    })
}

fn pushed_digest(status: &str) -> Option<String> {
    let rest = &status[status.find("digest: ")? + "digest: ".len()..];
    let digest = rest.split_whitespace().next()?;
    Digest::parse(digest).ok().map(|d| d.to_string())
}

/// Classifies a push failure reported by the engine.
fn push_error(message: &str, engine: bool) -> JobError {
    let lower = message.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    let code = if engine {
        ErrorCode::Unavailable
    } else if has(&[
        "unauthorized",
        "authentication required",
        "denied",
        "no basic auth credentials",
        "401",
        "403",
    ]) {
        ErrorCode::AuthFailed
    } else if has(&["name invalid", "invalid reference", "400 bad request"]) {
        ErrorCode::InvalidJob
    } else {
        // 5xx, refused or reset connections, and anything unknown: worth another attempt.
        ErrorCode::Unavailable
    };
    JobError::new(
        Stage::Export,
        code,
        format!("pushing the built image failed: {message}"),
    )
}

pub(super) async fn untag(docker: &Docker, reference: &str) {
    let options = RemoveImageOptions {
        force: false,
        noprune: true,
        ..RemoveImageOptions::default()
    };
    if let Err(e) = docker.remove_image(reference, Some(options), None).await {
        tracing::warn!(reference, error = %e, "Could not remove the pushed tag from the engine.");
    }
}

/// What a `docker save` stream held, once read: the config and the layers in order, each in a
/// temporary file.
struct Saved {
    config: Vec<u8>,
    layers: Vec<SavedLayer>,
}

#[derive(Clone)]
struct SavedLayer {
    digest: Digest,
    size: u64,
    file: PathBuf,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveManifestEntry {
    config: String,
    layers: Vec<String>,
}

/// Streams `docker save IMAGE` into `store` and tags it; returns the manifest digest and the
/// bytes the image takes (config, layers, manifest).
///
/// Layers are hashed into files in the store's own ingest directory (one file system with its
/// blobs) and renamed into place once their digest is known: the same atomic step the store's
/// blob writer ends with, without copying 50 MB a second time. What is not renamed is removed.
async fn save_to_layout(
    docker: &Docker,
    store: &OciLayoutStore,
    image: &str,
    (tag, source_id): (&str, &str),
    cx: &StageContext,
) -> Result<(String, u64), JobError> {
    let prefix = store.root().join(".ingest").join(format!(
        "build-{}-{}-",
        std::process::id(),
        random_hex(6)
    ));
    let result = save_and_store(docker, store, image, (tag, source_id), &prefix, cx).await;
    remove_leftovers(&prefix).await;
    result
}

/// Removes the ingest files named `prefix…` that were not renamed into the store.
async fn remove_leftovers(prefix: &Path) {
    let (Some(dir), Some(name)) = (prefix.parent(), prefix.file_name()) else {
        return;
    };
    let name = name.to_string_lossy().into_owned();
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        if entry.file_name().to_string_lossy().starts_with(&name) {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}

async fn save_and_store(
    docker: &Docker,
    store: &OciLayoutStore,
    image: &str,
    (tag, source_id): (&str, &str),
    prefix: &Path,
    cx: &StageContext,
) -> Result<(String, u64), JobError> {
    let (tx, rx) = mpsc::channel::<Bytes>(SAVE_CHUNKS_IN_FLIGHT);
    let reader_prefix = prefix.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || {
        read_saved(
            ChannelReader {
                rx,
                current: Bytes::new(),
            },
            &reader_prefix,
        )
    });

    let mut stream = docker.export_image(image);
    let mut failure = None;
    loop {
        let item = tokio::select! {
            biased;
            _ = cx.cancel.cancelled() => {
                failure = Some(JobError::cancelled(Stage::Export));
                break;
            }
            item = stream.next() => item,
        };
        match item {
            None => break,
            Some(Ok(chunk)) => {
                if tx.send(chunk).await.is_err() {
                    // The reader stopped early: its own error says why.
                    break;
                }
            }
            Some(Err(e)) => {
                failure = Some(JobError::transient(
                    Stage::Export,
                    ErrorCode::Unavailable,
                    format!("exporting the built image from the engine failed: {e}"),
                ));
                break;
            }
        }
    }
    drop(tx);
    let read = reader.await.map_err(|e| {
        JobError::transient(
            Stage::Export,
            ErrorCode::Internal,
            format!("the export reader failed: {e}"),
        )
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    let saved = read?;

    let config_digest = Digest::sha256_of(&saved.config);
    let config_size = saved.config.len() as u64;
    let mut total = config_size;
    if !store.has_blob(&config_digest, config_size).await {
        store
            .put_blob(saved.config.as_slice(), &config_digest, config_size)
            .await
            .map_err(|e| e.into_job_error(Stage::Export))?;
    }
    let mut layers = Vec::with_capacity(saved.layers.len());
    for layer in &saved.layers {
        if cx.cancel.is_cancelled() {
            return Err(JobError::cancelled(Stage::Export));
        }
        if !store.has_blob(&layer.digest, layer.size).await {
            // Hashed as it was written: the file is the blob.
            let path = store.blob_path(&layer.digest);
            tokio::fs::rename(&layer.file, &path)
                .await
                .map_err(|e| local_io(&path, &e))?;
        }
        total += layer.size;
        layers.push(Descriptor::new(OCI_LAYER_TAR, &layer.digest, layer.size));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": Descriptor::new(OCI_CONFIG, &config_digest, config_size),
        "layers": layers,
    });
    let bytes = serde_json::to_vec(&manifest).map_err(|e| {
        JobError::transient(
            Stage::Export,
            ErrorCode::Internal,
            format!("cannot write the image manifest: {e}"),
        )
    })?;
    let descriptor = store
        .put_manifest(OCI_MANIFEST, &bytes)
        .await
        .map_err(|e| e.into_job_error(Stage::Export))?;
    store
        .tag(&descriptor, tag, source_id)
        .await
        .map_err(|e| e.into_job_error(Stage::Export))?;
    Ok((descriptor.digest, total + descriptor.size))
}

/// Reads a `docker save` tar (blocking): layers into hashed files named `prefix<n>`, the JSON
/// files into memory.
fn read_saved(input: impl Read, prefix: &Path) -> Result<Saved, JobError> {
    let mut archive = tar::Archive::new(input);
    let mut json: HashMap<String, Vec<u8>> = HashMap::new();
    let mut layers: HashMap<String, SavedLayer> = HashMap::new();
    // `A/layer.tar -> ../B/layer.tar`: the engine links a layer it already wrote.
    let mut links: HashMap<String, String> = HashMap::new();
    let entries = archive.entries().map_err(save_format)?;
    for (n, entry) in entries.enumerate() {
        let mut entry = entry.map_err(save_format)?;
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_owned();
        let kind = entry.header().entry_type();
        if name.ends_with("/layer.tar") {
            if kind.is_symlink() {
                let target = entry
                    .link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned())
                    .unwrap_or_default();
                links.insert(name, target.trim_start_matches("../").to_owned());
            } else if kind.is_file() {
                let mut file = prefix.as_os_str().to_owned();
                file.push(n.to_string());
                let file = PathBuf::from(file);
                let (digest, size) = hash_to_file(&mut entry, &file)?;
                layers.insert(name, SavedLayer { digest, size, file });
            }
        } else if kind.is_file() && name.ends_with(".json") && !name.contains('/') {
            let mut bytes = Vec::new();
            entry
                .by_ref()
                .take(MAX_JSON_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(save_format)?;
            if bytes.len() as u64 > MAX_JSON_BYTES {
                return Err(export_malformed(format!(
                    "{name} is larger than {MAX_JSON_BYTES} bytes"
                )));
            }
            json.insert(name, bytes);
        }
    }
    let manifest = json
        .get("manifest.json")
        .ok_or_else(|| export_malformed("no manifest.json".to_owned()))?;
    let mut entries: Vec<SaveManifestEntry> = serde_json::from_slice(manifest)
        .map_err(|e| export_malformed(format!("manifest.json: {e}")))?;
    if entries.len() != 1 {
        return Err(export_malformed(format!(
            "expected one image, the export holds {}",
            entries.len()
        )));
    }
    let entry = entries.remove(0);
    let config = json
        .remove(&entry.config)
        .ok_or_else(|| export_malformed(format!("no config {}", entry.config)))?;
    let mut ordered = Vec::with_capacity(entry.layers.len());
    for name in &entry.layers {
        let resolved = links.get(name).unwrap_or(name);
        let layer = layers
            .get(resolved)
            .ok_or_else(|| export_malformed(format!("no layer {name}")))?;
        ordered.push(layer.clone());
    }
    Ok(Saved {
        config,
        layers: ordered,
    })
}

fn hash_to_file(entry: &mut impl Read, path: &Path) -> Result<(Digest, u64), JobError> {
    let mut file = std::fs::File::create(path).map_err(|e| local_io(path, &e))?;
    let mut hasher = Hasher::new(Algorithm::Sha256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = entry.read(&mut buf).map_err(save_format)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| local_io(path, &e))?;
        size += n as u64;
    }
    Ok((hasher.finish(), size))
}

fn save_format(e: std::io::Error) -> JobError {
    JobError::transient(
        Stage::Export,
        ErrorCode::Unavailable,
        format!("reading the engine's image export failed: {e}"),
    )
}

fn export_malformed(message: String) -> JobError {
    JobError::transient(
        Stage::Export,
        ErrorCode::Internal,
        format!("unexpected image export from the engine: {message}"),
    )
}

pub(super) fn local_io(path: &Path, e: &std::io::Error) -> JobError {
    JobError::transient(
        Stage::Export,
        ErrorCode::LocalIo,
        format!("{}: {e}", path.display()),
    )
}

/// `Read` over the chunks of the export stream (blocking; runs on a blocking thread).
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_push_digest_is_read_from_the_engines_last_status() {
        let status = "t1: digest: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef size: 527";
        assert_eq!(
            pushed_digest(status).as_deref(),
            Some("sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
        assert_eq!(pushed_digest("Pushing"), None);
    }

    #[test]
    fn refused_pushes_are_permanent_and_server_errors_transient() {
        use crate::error::ErrorClass;
        let denied = push_error("unauthorized: authentication required", false);
        assert_eq!(denied.code, ErrorCode::AuthFailed);
        assert_eq!(denied.class, ErrorClass::Permanent);
        let down = push_error(
            "received unexpected HTTP status: 503 Service Unavailable",
            false,
        );
        assert_eq!(down.class, ErrorClass::Transient);
    }
}
