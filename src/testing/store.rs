//! A synthetic `oci-layout` store written straight to disk (no hashing pipeline, no fsync), for
//! the collection benchmark and the collection crash test: `tags` images of `layers` blobs each
//! (the first shared by all), `sources` sources in turn, stored an hour apart, oldest first.

use std::path::Path;
use std::time::Duration;

use crate::clock::Clock;
use crate::manifest::Digest;

fn write_blob(root: &Path, bytes: &[u8]) -> std::io::Result<(String, u64)> {
    let digest = Digest::sha256_of(bytes);
    std::fs::write(root.join("blobs/sha256").join(digest.hex()), bytes)?;
    Ok((digest.to_string(), bytes.len() as u64))
}

/// Writes the store at `root`; returns the number of blobs. `orphans` more blobs are written
/// that no tag reaches.
pub fn synthetic_store(
    root: &Path,
    tags: usize,
    sources: usize,
    layers: usize,
    orphans: usize,
) -> std::io::Result<usize> {
    std::fs::create_dir_all(root.join("blobs/sha256"))?;
    std::fs::create_dir_all(root.join(".ingest"))?;
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let shared = write_blob(root, b"shared base layer")?;
    let now = crate::clock::SystemClock.now();
    let mut manifests = Vec::new();
    for i in 0..tags {
        let mut entries = vec![shared.clone()];
        for l in 1..layers {
            entries.push(write_blob(
                root,
                format!("layer {l} of image {i}").as_bytes(),
            )?);
        }
        let config = write_blob(root, format!("{{\"image\":{i}}}").as_bytes())?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.0, "size": config.1},
            "layers": entries.iter().map(|(d, s)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d, "size": s})).collect::<Vec<_>>(),
        });
        let (digest, size) = write_blob(root, &serde_json::to_vec(&manifest)?)?;
        let stored = now - Duration::from_secs(3600 * (tags - i) as u64);
        let source = format!("src-{}", i % sources);
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": size,
            "annotations": {
                "org.opencontainers.image.ref.name": format!("{source}:job-{i}"),
                "io.factoryd.source-id": source,
                "io.factoryd.stored-at": stored
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            }
        }));
    }
    for o in 0..orphans {
        write_blob(root, format!("orphan {o}").as_bytes())?;
    }
    let index = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
    std::fs::write(root.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(std::fs::read_dir(root.join("blobs/sha256"))?.count())
}
