//! Keeping a builder's BuildKit cache under `builder.cache_keep_bytes`
//! ([`Builder::prune_cache`](crate::ports::Builder::prune_cache)): background housekeeping,
//! never part of a job, so its errors are explained sentences, not [`JobError`]s.
//!
//! Two ways, by where BuildKit's API is:
//!
//! * **The Docker Engine's HTTP API** (the `docker` backend): `GET /system/df` for the cache's
//!   size, then, when it is above the limit, `POST /build/prune` with `all` and the limit. The
//!   limit's name depends on the API version the engine speaks: `keep-storage` before 1.48 (Debian's
//!   20.10 speaks 1.41), `max-used-space` from 1.48 on, where `keep-storage` alone became
//!   BuildKit's `reservedSpace` and no longer caps the cache. Plain HTTP requests on the engine's
//!   socket, not bollard's: bollard 0.21 models both calls for API 1.52 (its
//!   `PruneBuildOptions` has no `keep-storage`; its `/system/df` answer has `BuildCacheUsage`
//!   where older engines answer a `BuildCache` list), which a 20.10 engine neither takes nor
//!   sends. What was reclaimed is the answer's `SpaceReclaimed`.
//! * **BuildKit's control API** (the `buildkitd` backend: a standalone buildkitd, or the
//!   engine's own BuildKit on its `/grpc`): `Control/DiskUsage`, then `Control/Prune` with
//!   `all` and the limit ([`super::grpc::prune_cache`]); what was reclaimed is the sum of the
//!   records Prune reports deleted.
//!
//! Either way the cache's size is what `docker system df` shows as "Build Cache" and what
//! BuildKit compares with its limit: the sizes of its records not shared with an image. BuildKit
//! deletes whole records, least recently used first, until the rest is at most the limit;
//! records in use by a running build are never deleted, so a prune during builds can leave the
//! cache above the limit. Must not: prune when the limit is 0 (to BuildKit a 0 limit means
//! "no limit: delete everything"), or put a credential in an error (none is involved).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use crate::config::DaemonAddr;
use crate::ports::CachePrune;
use crate::telemetry::metrics;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long one prune (size, prune and all) may take before it is given up: pruning a large
/// cache deletes many snapshots, but a daemon that hangs must not hold the caller for ever.
const PRUNE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Cap on an engine answer's body: `/system/df` lists every image, container, volume and cache
/// record.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The first API version whose `/build/prune` caps the cache with `max-used-space`.
const MAX_USED_SPACE_API: (usize, usize) = (1, 48);

/// The first API version whose `/system/df` takes `type` (only the build cache is wanted).
const DF_TYPE_API: (usize, usize) = (1, 42);

/// Runs `prune` within [`PRUNE_TIMEOUT`], then logs and counts its outcome: the one call site
/// of both backends' prunes. `who` names the builder in the log and in a timeout's error.
pub(super) async fn recorded(
    who: &str,
    keep_bytes: u64,
    prune: impl std::future::Future<Output = Result<CachePrune, String>>,
) -> Result<CachePrune, String> {
    let result = match tokio::time::timeout(PRUNE_TIMEOUT, prune).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "{who} did not finish pruning its build cache in {} s",
            PRUNE_TIMEOUT.as_secs()
        )),
    };
    let m = metrics();
    match &result {
        Ok(pruned) => {
            m.builder_cache_prunes.with_label_values(&["ok"]).inc();
            m.builder_cache_pruned_bytes.inc_by(pruned.reclaimed_bytes);
            m.builder_cache_bytes
                .set(i64::try_from(pruned.after_bytes()).unwrap_or(i64::MAX));
            if pruned.reclaimed_bytes > 0 {
                info!(
                    builder = who,
                    keep_bytes,
                    before_bytes = pruned.before_bytes,
                    reclaimed_bytes = pruned.reclaimed_bytes,
                    "Pruned the build cache."
                );
            }
        }
        Err(e) => {
            m.builder_cache_prunes.with_label_values(&["failed"]).inc();
            warn!(builder = who, keep_bytes, error = %e, "Could not prune the build cache.");
        }
    }
    result
}

/// The cache's size from the sizes and `shared` flags of its records: the records not shared
/// with an image, as `docker system df` and BuildKit's limit count them.
pub(super) fn unshared_bytes(records: impl IntoIterator<Item = (i64, bool)>) -> u64 {
    records
        .into_iter()
        .filter(|(_, shared)| !shared)
        .map(|(size, _)| u64::try_from(size).unwrap_or(0))
        .sum()
}

/// The limit as BuildKit and the engine take it: a signed 64-bit number.
pub(super) fn signed_limit(keep_bytes: u64) -> Result<i64, String> {
    i64::try_from(keep_bytes).map_err(|_| {
        format!("a cache limit of {keep_bytes} bytes is more than BuildKit takes (2^63 - 1)")
    })
}

/// Prunes the build cache of the Docker Engine at `host` through its HTTP API (see the module
/// docs).
pub(super) async fn prune_engine_cache(
    host: &DaemonAddr,
    keep_bytes: u64,
) -> Result<CachePrune, String> {
    let docker = super::connect(host).await.map_err(|e| e.message)?;
    let version = docker.client_version();
    let api = (version.major_version, version.minor_version);
    let prefix = format!("/v{}.{}", api.0, api.1);

    let df = if api >= DF_TYPE_API {
        format!("{prefix}/system/df?type=build-cache")
    } else {
        format!("{prefix}/system/df")
    };
    let usage: EngineDiskUsage =
        engine_json(host, Method::GET, &df, "report its disk usage").await?;
    let before_bytes = usage.build_cache_bytes();
    if keep_bytes == 0 || before_bytes <= keep_bytes {
        return Ok(CachePrune {
            before_bytes,
            reclaimed_bytes: 0,
        });
    }

    let prune = format!(
        "{prefix}/build/prune?{}",
        prune_query(api, signed_limit(keep_bytes)?)
    );
    let pruned: EnginePruneAnswer =
        engine_json(host, Method::POST, &prune, "prune its build cache").await?;
    Ok(CachePrune {
        before_bytes,
        reclaimed_bytes: u64::try_from(pruned.space_reclaimed.unwrap_or(0)).unwrap_or(0),
    })
}

/// `/build/prune`'s query for an engine speaking API `api`: every kind of record, down to
/// `limit`, under the limit's name in that version (see the module docs).
fn prune_query(api: (usize, usize), limit: i64) -> String {
    let limit_name = if api >= MAX_USED_SPACE_API {
        "max-used-space"
    } else {
        "keep-storage"
    };
    format!("all=1&{limit_name}={limit}")
}

/// `/system/df`'s answer, as far as the build cache goes: the `BuildCache` records (API before
/// 1.52, and later ones asked with an older version), or `BuildCacheUsage` (1.52 on).
#[derive(Debug, Default, Deserialize)]
struct EngineDiskUsage {
    #[serde(rename = "BuildCache", default)]
    build_cache: Option<Vec<EngineCacheRecord>>,
    #[serde(rename = "BuildCacheUsage", default)]
    build_cache_usage: Option<EngineCacheUsage>,
}

#[derive(Debug, Deserialize)]
struct EngineCacheRecord {
    #[serde(rename = "Size", default)]
    size: i64,
    #[serde(rename = "Shared", default)]
    shared: bool,
}

#[derive(Debug, Deserialize)]
struct EngineCacheUsage {
    #[serde(rename = "TotalSize", default)]
    total_size: i64,
}

impl EngineDiskUsage {
    fn build_cache_bytes(&self) -> u64 {
        match (&self.build_cache, &self.build_cache_usage) {
            (Some(records), _) => unshared_bytes(records.iter().map(|r| (r.size, r.shared))),
            (None, Some(usage)) => u64::try_from(usage.total_size).unwrap_or(0),
            (None, None) => 0,
        }
    }
}

/// `/build/prune`'s answer.
#[derive(Debug, Deserialize)]
struct EnginePruneAnswer {
    #[serde(rename = "SpaceReclaimed", default)]
    space_reclaimed: Option<i64>,
}

/// One request to the engine, its JSON answer decoded; `what` says what the engine was asked to
/// do, for the error.
async fn engine_json<T: serde::de::DeserializeOwned>(
    host: &DaemonAddr,
    method: Method,
    path_and_query: &str,
    what: &str,
) -> Result<T, String> {
    let (status, body) = engine_request(host, method, path_and_query)
        .await
        .map_err(|e| format!("the Docker Engine at {host} is unavailable: {e}"))?;
    if !status.is_success() {
        let message = serde_json::from_slice::<EngineErrorAnswer>(&body)
            .map(|a| a.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
        return Err(format!(
            "the Docker Engine at {host} refused to {what} ({}): {message}",
            status.as_u16()
        ));
    }
    serde_json::from_slice(&body).map_err(|e| {
        format!("the Docker Engine at {host} was asked to {what} and answered unexpected JSON: {e}")
    })
}

#[derive(Deserialize)]
struct EngineErrorAnswer {
    message: String,
}

async fn engine_request(
    host: &DaemonAddr,
    method: Method,
    path_and_query: &str,
) -> Result<(StatusCode, Bytes), BoxError> {
    match host {
        DaemonAddr::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path).await?;
            send(stream, method, path_and_query).await
        }
        DaemonAddr::Tcp { host, port } => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            send(stream, method, path_and_query).await
        }
    }
}

/// One HTTP/1.1 request on its own connection, closed when the answer has been read.
async fn send<S>(
    stream: S,
    method: Method,
    path_and_query: &str,
) -> Result<(StatusCode, Bytes), BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let _connection = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(connection));
    let request = hyper::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, "docker-engine")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_size_leaves_out_records_shared_with_images() {
        let usage: EngineDiskUsage = serde_json::from_str(
            r#"{"LayersSize":1,"Images":[],"BuildCache":[
                {"ID":"a","Size":100,"Shared":false,"InUse":false},
                {"ID":"b","Size":40,"Shared":true,"InUse":false},
                {"ID":"c","Size":7,"Shared":false,"InUse":true}]}"#,
        )
        .unwrap();
        assert_eq!(usage.build_cache_bytes(), 107);
    }

    #[test]
    fn newer_engines_report_the_cache_as_a_total() {
        let usage: EngineDiskUsage =
            serde_json::from_str(r#"{"BuildCacheUsage":{"TotalSize":5000,"Reclaimable":10}}"#)
                .unwrap();
        assert_eq!(usage.build_cache_bytes(), 5000);
        let none: EngineDiskUsage = serde_json::from_str(r#"{"BuildCache":null}"#).unwrap();
        assert_eq!(none.build_cache_bytes(), 0);
    }

    #[test]
    fn the_limit_goes_by_the_name_the_engines_api_version_reads_as_a_cap() {
        assert_eq!(prune_query((1, 41), 100), "all=1&keep-storage=100");
        assert_eq!(prune_query((1, 47), 100), "all=1&keep-storage=100");
        assert_eq!(prune_query((1, 48), 100), "all=1&max-used-space=100");
        assert_eq!(prune_query((2, 0), 100), "all=1&max-used-space=100");
    }

    #[test]
    fn a_limit_beyond_a_signed_64_bit_number_is_refused_not_wrapped() {
        assert_eq!(signed_limit(10 << 30), Ok(10 << 30));
        let e = signed_limit(u64::MAX).unwrap_err();
        assert!(e.contains("more than BuildKit takes"), "{e}");
    }

    #[tokio::test]
    async fn an_engine_that_does_not_answer_is_an_explained_error() {
        let dir = tempfile::tempdir().unwrap();
        let host = DaemonAddr::Unix(dir.path().join("docker.sock"));
        let e = recorded("test", 1, prune_engine_cache(&host, 1))
            .await
            .unwrap_err();
        assert!(
            e.contains("docker.sock") && e.contains("unavailable"),
            "{e}"
        );
    }
}
