//! Driver for `scripts/bench-store-gc.sh`: writes a synthetic OCI layout store of TAGS images
//! (SOURCES sources, LAYERS layers each, the first layer shared by all), then times
//! collections of it with the real `factoryd::store::collect`: one that keeps everything (mark
//! all, sweep nothing) and one whose retention drops half the images (and sweeps their blobs).
//! Prints one `key=value` line per figure.

// Benchmarks time real work in real time; the clock port's lint is for the daemon's code.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::path::Path;
use std::time::{Duration, Instant};

use factoryd::manifest::Digest;
use factoryd::store::{collect, Collection, Policy};

fn write_blob(root: &Path, bytes: &[u8]) -> (String, u64) {
    let digest = Digest::sha256_of(bytes);
    std::fs::write(root.join("blobs/sha256").join(digest.hex()), bytes).unwrap();
    (digest.to_string(), bytes.len() as u64)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [phase, dir, tags, sources, layers] = &args[..] else {
        eprintln!("usage: store_gc setup|collect DIR TAGS SOURCES LAYERS");
        std::process::exit(64);
    };
    let (tags, sources, layers): (usize, usize, usize) = (
        tags.parse().unwrap(),
        sources.parse().unwrap(),
        layers.parse().unwrap(),
    );
    let root = Path::new(dir);
    if phase == "collect" {
        return collect_phase(root, tags, sources);
    }
    std::fs::create_dir_all(root.join("blobs/sha256")).unwrap();
    std::fs::create_dir_all(root.join(".ingest")).unwrap();
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();

    let started = Instant::now();
    let shared = write_blob(root, b"shared base layer");
    let mut manifests = Vec::new();
    // Stored a day apart... no: an hour apart, oldest first, so retention has an order.
    let base = time::OffsetDateTime::now_utc() - Duration::from_secs(3600 * tags as u64);
    for i in 0..tags {
        let mut entries = vec![shared.clone()];
        for l in 1..layers {
            entries.push(write_blob(
                root,
                format!("layer {l} of image {i}").as_bytes(),
            ));
        }
        let config = write_blob(root, format!("{{\"image\":{i}}}").as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.0, "size": config.1},
            "layers": entries.iter().map(|(d, s)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}))
                .collect::<Vec<_>>(),
        });
        let (digest, size) = write_blob(root, &serde_json::to_vec(&manifest).unwrap());
        let stored = base + Duration::from_secs(3600 * i as u64);
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": size,
            "annotations": {
                "org.opencontainers.image.ref.name": format!("src-{}:job-{i}", i % sources),
                "io.factoryd.source-id": format!("src-{}", i % sources),
                "io.factoryd.stored-at": stored
                    .format(&time::format_description::well_known::Rfc3339).unwrap(),
            }
        }));
    }
    let index = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
    std::fs::write(root.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let blobs = std::fs::read_dir(root.join("blobs/sha256"))
        .unwrap()
        .count();
    println!(
        "tags={tags} blobs={blobs} setup_s={:.2}",
        started.elapsed().as_secs_f64()
    );
}

fn collect_phase(root: &Path, tags: usize, sources: usize) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let keep_all = Policy {
        keep_per_source: 0,
        max_age: None,
        max_bytes: 0,
        min_age: Duration::ZERO,
    };
    for run in 0..3 {
        let t = Instant::now();
        let report = collect(
            root,
            Collection {
                policy: keep_all,
                dry_run: false,
            },
            now_ms,
        )
        .unwrap();
        println!(
            "keep_all_run={run} seconds={:.3} kept={} blobs_left={} removed={}",
            t.elapsed().as_secs_f64(),
            report.kept,
            report.blobs_left,
            report.blobs_removed
        );
    }
    let half = Policy {
        keep_per_source: (tags / sources / 2) as u32,
        ..keep_all
    };
    let t = Instant::now();
    let report = collect(
        root,
        Collection {
            policy: half,
            dry_run: false,
        },
        now_ms,
    )
    .unwrap();
    println!(
        "drop_half seconds={:.3} dropped={} kept={} removed={} blobs_left={}",
        t.elapsed().as_secs_f64(),
        report.dropped.len(),
        report.kept,
        report.blobs_removed,
        report.blobs_left
    );
}
