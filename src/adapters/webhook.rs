//! Credentials from a webhook (`oci-registry` auth `webhook`): an HTTP GET to the job's URL whose
//! body is base64 of `username:password`.
//!
//! The URL is the job's, so the request runs under the egress policy (resolved addresses and
//! every redirect), with a timeout and a cap on the body. What it must not do: echo the body, or
//! any part of it, in an error or a log line — a malformed body may still hold a secret.

use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use url::Url;

use crate::egress::{refusal_in, EgressPolicy};
use crate::error::{classify_http_status, ErrorCode, JobError, Stage};
use crate::ports::BasicAuth;
use crate::secret::Secret;

const STAGE: Stage = Stage::Resolve;

pub struct WebhookCredentials {
    http: reqwest::Client,
    egress: EgressPolicy,
    max_bytes: usize,
}

impl WebhookCredentials {
    pub fn new(
        egress: EgressPolicy,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<WebhookCredentials, JobError> {
        let http = egress
            .http_client(reqwest::Client::builder())
            .timeout(timeout)
            .build()
            .map_err(|e| {
                JobError::transient(
                    STAGE,
                    ErrorCode::Internal,
                    format!("cannot build the webhook HTTP client: {e}"),
                )
            })?;
        Ok(WebhookCredentials {
            http,
            egress,
            max_bytes,
        })
    }

    /// Calls the webhook and decodes its answer.
    pub async fn fetch(&self, url: &str) -> Result<BasicAuth, JobError> {
        let url = Url::parse(url).map_err(|_| {
            JobError::permanent(
                STAGE,
                ErrorCode::InvalidJob,
                "the credentials webhook URL is not a valid URL",
            )
        })?;
        let host = url.host_str().unwrap_or_default().to_owned();
        self.egress
            .check_url(&url)
            .map_err(|r| r.into_job_error(STAGE))?;
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| webhook_request_error(&host, e))?;
        let status = response.status().as_u16();
        if let Some((code, class)) = classify_http_status(status) {
            return Err(JobError::new(
                STAGE,
                code,
                format!("the credentials webhook on {host} answered HTTP {status}"),
            )
            .with_class(class));
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| webhook_request_error(&host, e))?;
            if body.len() + chunk.len() > self.max_bytes {
                return Err(JobError::permanent(
                    STAGE,
                    ErrorCode::LimitExceeded,
                    format!(
                        "the credentials webhook on {host} answered more than {} bytes",
                        self.max_bytes
                    ),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        decode_body(&body).ok_or_else(|| {
            JobError::permanent(
                STAGE,
                ErrorCode::AuthFailed,
                format!(
                    "the credentials webhook on {host} answered {} bytes that are not base64 of \
                     username:password (the body is not shown)",
                    body.len()
                ),
            )
        })
    }
}

/// Classifies a reqwest failure (no response) of a call to the credentials webhook on `host`.
fn webhook_request_error(host: &str, err: reqwest::Error) -> JobError {
    if let Some(refused) = refusal_in(&err) {
        return refused.clone().into_job_error(STAGE);
    }
    let code = if err.is_timeout() {
        ErrorCode::Timeout
    } else {
        ErrorCode::Unavailable
    };
    JobError::transient(
        STAGE,
        code,
        format!("the credentials webhook on {host} could not be reached ({code})"),
    )
}

/// Base64 (standard, padded or not; surrounding white space ignored) of `username:password`
/// with a non-empty user name.
fn decode_body(body: &[u8]) -> Option<BasicAuth> {
    let text = std::str::from_utf8(body).ok()?.trim();
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
    ];
    let decoded = engines.iter().find_map(|e| e.decode(text).ok())?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (username, password) = decoded.split_once(':')?;
    if username.is_empty() || username.chars().any(char::is_control) {
        return None;
    }
    Some(BasicAuth {
        username: username.to_owned(),
        password: Secret::new(password),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_base64_user_and_password() {
        let auth = decode_body(b"  dXNlcjpwYTpzcw==\n").unwrap();
        assert_eq!(auth.username, "user");
        assert_eq!(auth.password.expose(), "pa:ss");
    }

    #[test]
    fn refuses_bodies_that_are_not_base64_user_colon_password() {
        assert!(decode_body(b"user:password").is_none());
        assert!(decode_body(b"bm9jb2xvbg==").is_none(), "no colon");
        assert!(decode_body(b"OnNlY3JldA==").is_none(), "empty user");
        assert!(decode_body(&[0xff, 0xfe]).is_none());
    }
}
