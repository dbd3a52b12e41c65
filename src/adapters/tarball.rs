//! Web-served tar.gz sources: a streamed download into the job's workspace, then sealing by
//! [`super::archive`].
//!
//! The download goes through the egress policy's HTTP client (resolved addresses and every
//! redirect checked), is written chunk by chunk (never buffered whole), stops at
//! `sources.max_fetch_bytes`, and has a connect timeout and a read (stall) timeout. Statuses are
//! classified once: 404/410 permanent, 401/403 permanent `auth_failed`, 408/429/5xx transient.
//! Messages name the URL without userinfo or query string (which often carries a signature).
//!
//! Must not: extract the archive, or read it into memory.

use std::time::Duration;

use tokio::time::Instant;

use tokio::io::AsyncWriteExt;
use url::Url;

use super::archive;
use crate::config::SourcesConfig;
use crate::context::Limits;
use crate::egress::{refusal_in, EgressPolicy};
use crate::error::{classify_http_status, ErrorCode, JobError, Stage};
use crate::job::JobEvent;
use crate::ports::{SealedContext, StageContext};

/// The archive's file name inside the workspace.
const ARCHIVE_FILE: &str = "source.tar.gz";

const PROGRESS_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct TarballFetcher {
    client: reqwest::Client,
    policy: EgressPolicy,
    max_fetch_bytes: u64,
    limits: Limits,
}

pub struct TarballSource {
    pub context: SealedContext,
    pub fetched_bytes: u64,
}

impl TarballFetcher {
    pub fn new(config: &SourcesConfig, policy: EgressPolicy) -> Result<TarballFetcher, JobError> {
        let client = policy
            .http_client(reqwest::Client::builder())
            .connect_timeout(config.download_connect_timeout)
            .read_timeout(config.download_read_timeout)
            .user_agent(concat!("factoryd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                JobError::transient(
                    Stage::Fetch,
                    ErrorCode::Internal,
                    format!("cannot build the HTTP client: {e}"),
                )
            })?;
        Ok(TarballFetcher {
            client,
            policy,
            max_fetch_bytes: config.max_fetch_bytes,
            limits: Limits::from_config(config),
        })
    }

    pub async fn fetch(
        &self,
        url: &str,
        context_dir: &str,
        build_file: &str,
        cx: &StageContext,
    ) -> Result<TarballSource, JobError> {
        let parsed = Url::parse(url).map_err(|e| {
            JobError::permanent(
                Stage::Fetch,
                ErrorCode::InvalidJob,
                format!("targz_url is not a URL: {e}"),
            )
        })?;
        let shown = display_url(&parsed);
        self.policy
            .check_url(&parsed)
            .map_err(|r| r.into_job_error(Stage::Fetch))?;
        let path = cx.workspace.join(ARCHIVE_FILE);
        let fetched_bytes = tokio::select! {
            biased;
            () = cx.cancel.cancelled() => return Err(JobError::cancelled(Stage::Fetch)),
            r = self.download(parsed, &shown, &path, cx) => r?,
        };
        let limits = self.limits;
        let context_dir = context_dir.to_owned();
        let build_file = build_file.to_owned();
        let cancel = cx.cancel.clone();
        let context = tokio::task::spawn_blocking(move || {
            archive::seal(&path, &context_dir, &build_file, limits, cancel)
        })
        .await
        .map_err(|e| {
            JobError::transient(
                Stage::Seal,
                ErrorCode::Internal,
                format!("the archive check failed: {e}"),
            )
        })??;
        Ok(TarballSource {
            context,
            fetched_bytes,
        })
    }

    async fn download(
        &self,
        url: Url,
        shown: &str,
        path: &std::path::Path,
        cx: &StageContext,
    ) -> Result<u64, JobError> {
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| tarball_request_error(&e, shown))?;
        let status = response.status().as_u16();
        if let Some((code, class)) = classify_http_status(status) {
            let mut err = JobError::new(
                Stage::Fetch,
                code,
                format!("GET {shown} answered HTTP {status}"),
            )
            .with_class(class);
            if let Some(after) = retry_after(&response) {
                err = err.with_retry_after(after);
            }
            return Err(err);
        }
        let over_cap = || {
            JobError::permanent(
                Stage::Fetch,
                ErrorCode::LimitExceeded,
                format!(
                    "{shown} is larger than {} bytes (sources.max_fetch_bytes)",
                    self.max_fetch_bytes
                ),
            )
        };
        let total = response.content_length();
        if total.is_some_and(|t| t > self.max_fetch_bytes) {
            return Err(over_cap());
        }
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .map_err(local_io)?;
        let mut file = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        let mut done: u64 = 0;
        let mut last_emit = Instant::now();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| tarball_request_error(&e, shown))?
        {
            done += chunk.len() as u64;
            if done > self.max_fetch_bytes {
                return Err(over_cap());
            }
            file.write_all(&chunk).await.map_err(local_io)?;
            if last_emit.elapsed() >= PROGRESS_EVERY {
                last_emit = Instant::now();
                cx.emit(JobEvent::Progress {
                    stage: Stage::Fetch,
                    item: "archive".to_owned(),
                    done_bytes: done,
                    total_bytes: total,
                });
            }
        }
        file.flush().await.map_err(local_io)?;
        cx.emit(JobEvent::Progress {
            stage: Stage::Fetch,
            item: "archive".to_owned(),
            done_bytes: done,
            total_bytes: total,
        });
        Ok(done)
    }
}

/// `scheme://host[:port]/path`: no userinfo, no query, no fragment.
pub fn display_url(url: &Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

/// Classifies a reqwest failure (no response) of the tarball download shown as `shown`.
fn tarball_request_error(e: &reqwest::Error, shown: &str) -> JobError {
    if let Some(refused) = refusal_in(e) {
        return refused.clone().into_job_error(Stage::Fetch);
    }
    // Without the URL: reqwest's text would carry its query string.
    let detail = {
        let mut text = String::new();
        let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
        while let Some(s) = source {
            text = s.to_string();
            source = s.source();
        }
        if text.is_empty() {
            "request failed".to_owned()
        } else {
            text
        }
    };
    let (code, message) = if e.is_timeout() {
        (
            ErrorCode::Timeout,
            format!("GET {shown} timed out: {detail}"),
        )
    } else if e.is_redirect() {
        return JobError::permanent(
            Stage::Fetch,
            ErrorCode::InvalidJob,
            format!("GET {shown}: too many redirects"),
        );
    } else {
        (
            ErrorCode::Unavailable,
            format!("GET {shown} failed: {detail}"),
        )
    };
    JobError::transient(Stage::Fetch, code, message)
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

fn local_io(e: std::io::Error) -> JobError {
    let (code, class) = crate::error::classify_io(&e);
    JobError::new(
        Stage::Fetch,
        code,
        format!("writing the download into the workspace failed: {e}"),
    )
    .with_class(class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_lose_userinfo_and_query() {
        let url = Url::parse("https://u:p@files.example.com:8443/a.tar.gz?X-Sig=abc#f").unwrap();
        assert_eq!(display_url(&url), "https://files.example.com:8443/a.tar.gz");
    }
}
