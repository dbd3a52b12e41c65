//! Command-line entry for `scripts/bench-import.sh`: runs one import with the real
//! [`RegistryImporter`], and writes synthetic test images. Not a factoryd subcommand.
//!
//! ```text
//! import copy SOURCE DEST [--parallel N]   SOURCE = host:port/repo:tag (plain http)
//!                                          DEST   = oci:DIR:TAG | docker://host:port/repo:tag
//! import seed DIR TAG COUNT SIZE           an OCI layout with COUNT gzip layers of SIZE bytes
//! ```
//! `copy` prints `elapsed_ms=… transferred_bytes=… digest=…` on success.

// Benchmarks time real work in real time; the clock port's lint is for the daemon's code.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use factoryd::adapters::oci::{ImporterSettings, RegistryImporter, RequestRetry};
use factoryd::config::Platform;
use factoryd::egress::EgressPolicy;
use factoryd::error::JobError;
use factoryd::job::{JobEvent, Origin, Redactor};
use factoryd::ports::{
    BasicAuth, CredentialResolver, Destination, EventSink, ImportRequest, Importer, StageContext,
};
use sha2::{Digest as _, Sha256};

struct Anonymous;

#[async_trait]
impl CredentialResolver for Anonymous {
    async fn resolve(
        &self,
        _: &Origin,
        _: bool,
        _: &StageContext,
    ) -> Result<Option<BasicAuth>, JobError> {
        Ok(None)
    }
}

#[derive(Default)]
struct Bytes(std::sync::atomic::AtomicU64);

impl EventSink for Bytes {
    fn emit(&self, event: JobEvent) {
        if let JobEvent::Progress {
            done_bytes,
            total_bytes,
            ..
        } = event
        {
            if Some(done_bytes) == total_bytes {
                self.0
                    .fetch_add(done_bytes, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: import copy SOURCE DEST [--parallel N] | import seed DIR TAG COUNT SIZE");
    std::process::exit(64);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("copy") if args.len() >= 3 => {
            let parallel = match args.get(3).map(String::as_str) {
                Some("--parallel") => args
                    .get(4)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage()),
                None => 4,
                _ => usage(),
            };
            copy(&args[1], &args[2], parallel).await
        }
        Some("seed") if args.len() == 5 => {
            let count = args[3].parse().unwrap_or_else(|_| usage());
            let size = args[4].parse().unwrap_or_else(|_| usage());
            seed(Path::new(&args[1]), &args[2], count, size)
        }
        _ => usage(),
    }
}

async fn copy(source: &str, dest: &str, parallel: usize) {
    let (host, target) = source.split_once('/').unwrap_or_else(|| usage());
    let job = factoryd::job::decode_value(&serde_json::json!({
        "v": 1, "id": "bench", "source_id": "bench",
        "origin": {"type": "docker-registry", "details": {"url": format!("http://{host}"), "target": target}},
    }))
    .unwrap_or_else(|p| {
        eprintln!("{p}");
        std::process::exit(64)
    });
    let Origin::DockerRegistry(origin) = &job.origin else {
        usage()
    };
    let destination = if let Some(rest) = dest.strip_prefix("oci:") {
        let (path, tag) = rest.rsplit_once(':').unwrap_or_else(|| usage());
        Destination::OciLayout {
            path: path.into(),
            tag: tag.into(),
            source_id: "bench".into(),
        }
    } else if let Some(rest) = dest.strip_prefix("docker://") {
        let (registry, path) = rest.split_once('/').unwrap_or_else(|| usage());
        let (repository, tag) = path.rsplit_once(':').unwrap_or_else(|| usage());
        Destination::Registry {
            registry: registry.into(),
            plain_http: true,
            repository: repository.into(),
            tag: tag.into(),
            auth: None,
        }
    } else {
        usage()
    };
    let importer = RegistryImporter::new(
        ImporterSettings {
            platforms: vec![Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None,
            }],
            mirrors: Default::default(),
            max_parallel_blobs: parallel,
            max_manifest_bytes: 4 << 20,
            max_blob_bytes: 16 << 30,
            retry: RequestRetry::default(),
        },
        EgressPolicy {
            allow_loopback: true,
            allow_private: true,
        },
    )
    .unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let events = Arc::new(Bytes::default());
    let cx = StageContext {
        attempt: 1,
        job_id: "bench".into(),
        cancel: tokio_util::sync::CancellationToken::new(),
        events: events.clone(),
        redactor: Arc::new(Redactor::default()),
        workspace: std::env::temp_dir(),
    };
    let started = Instant::now();
    let result = importer
        .import(
            ImportRequest {
                origin: &job.origin,
                source: origin.target.clone(),
                plain_http: true,
                auth: None,
                resolver: &Anonymous,
                destination,
            },
            &cx,
        )
        .await;
    let elapsed: Duration = started.elapsed();
    match result {
        Ok(info) => println!(
            "elapsed_ms={} transferred_bytes={} digest={}",
            elapsed.as_millis(),
            events.0.load(std::sync::atomic::Ordering::Relaxed),
            info.digest
        ),
        Err(e) => {
            eprintln!("import failed: {e}");
            std::process::exit(1)
        }
    }
}

/// Writes an OCI layout with one image of `count` gzip (stored, uncompressed deflate) layers of
/// `size` random bytes each.
fn seed(dir: &Path, tag: &str, count: usize, size: usize) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("create layout");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
    let put = |bytes: &[u8]| {
        let digest = hex::encode(Sha256::digest(bytes));
        std::fs::write(blobs.join(&digest), bytes).expect("write blob");
        format!("sha256:{digest}")
    };
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (count as u64) << 32 ^ size as u64;
    let mut layers = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..count {
        let tmp = dir.join(format!("layer-{i}.tmp"));
        let file = std::fs::File::create(&tmp).expect("create layer");
        let mut gz = flate2::write::GzEncoder::new(
            std::io::BufWriter::new(file),
            flate2::Compression::none(),
        );
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len());
            for chunk in buf[..n].chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            gz.write_all(&buf[..n]).expect("write layer");
            left -= n;
        }
        gz.finish().expect("gzip").flush().expect("flush");
        let mut hasher = Sha256::new();
        let mut file = std::fs::File::open(&tmp).expect("open layer");
        let len = std::io::copy(&mut file, &mut hasher).expect("hash layer");
        let digest = hex::encode(hasher.finalize());
        std::fs::rename(&tmp, blobs.join(&digest)).expect("rename layer");
        layers.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{digest}"), "size": len}));
    }
    let config = serde_json::to_vec(&serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})).expect("json");
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": layers,
    }))
    .expect("json");
    let manifest_digest = put(&manifest);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("write index");
}
